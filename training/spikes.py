"""Loss spikes that recover by themselves: detect one, find out what caused it, skip exactly the bad data.

    detector = LossSpikeCallback(zscore=6.0, window=50)
    trainer, result = train_with_rollbacks(make_trainer, resume, max_rollbacks=3)

A step's loss (the mean over the whole global batch) is a spike when it lies more than `zscore` standard
deviations above the mean of the previous `window` steps' losses. The detector then stops training at that
step without saving, and `train_with_rollbacks` looks before it skips anything: from the weights of the newest
intact checkpoint before the spike it scores, forward only, each block the steps since that checkpoint read and
the blocks of the steps after the spike (`skip_ahead` of them, or as many as lie between checkpoint and spike),
against the blocks the run trained on just before the checkpoint (`judge_blocks`). Then:

- blocks that stand out (bad data: a corrupted region of any length, contiguous or scattered) are skipped, and
  only they: the screen goes on past the spike until a step reads no bad block; the run resumes from the
  checkpoint without them (`DataState`, saved as `data_state.json` in every later checkpoint, so a resume after
  the rollback is exact too);
- no block stands out, or the spiking step's ordinary blocks share the rise, or it lasts a whole `window` of
  steps past the spike: the fresh data shares it, so it is a shift in the data, not bad data; nothing is
  skipped, the detector starts over from the checkpoint (re-baselined), and the run goes on.

Either way the decision and its numbers are recorded with the rollback and listed in the run report. PaLM
(Chowdhery et al. 2022) handled its spikes by hand: restart about 100 steps before the spike and skip 200-500
batches, bad or not.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from cli import ConfigError
from training.checkpoints import latest_complete_checkpoint, saved_step
from training.data_order import block_ranges, blocks_of_ranges

DATA_STATE_FILE = "data_state.json"


@dataclass
class DataState:
    """Blocks a run no longer reads and the rollbacks that took them out, as a checkpoint records them."""

    skipped: set[int] = field(default_factory=set)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"skipped_blocks": block_ranges(self.skipped), "rollbacks": self.rollbacks}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataState:
        return cls(blocks_of_ranges(data.get("skipped_blocks", [])), list(data.get("rollbacks", [])))

    def restarts(self) -> set[int]:
        """Checkpoint steps a rollback re-baselined the detector from (a shift in the data)."""
        return {event["resumed_from_step"] for event in self.rollbacks if event.get("decision") == "shift"}

    def merge(self, other: DataState) -> None:
        """Take in what a checkpoint recorded: a rollback decided after that checkpoint stays."""
        self.skipped |= other.skipped
        known = {event["spike_step"] for event in self.rollbacks}
        self.rollbacks = sorted(self.rollbacks + [e for e in other.rollbacks if e["spike_step"] not in known],
                                key=lambda event: event["rollback"])

    def write(self, checkpoint: str | Path) -> None:
        (Path(checkpoint) / DATA_STATE_FILE).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, checkpoint: str | Path) -> DataState | None:
        path = Path(checkpoint) / DATA_STATE_FILE
        return cls.from_json(json.loads(path.read_text())) if path.is_file() else None


class LossSpikeCallback(TrainerCallback, ExportableState):
    """Stops training at a loss spike: a step loss more than `zscore` standard deviations above the mean of the
    previous `window` step losses (a spike is never added to the window; non-finite losses are the NaN
    guard's business and are passed over). The window is saved in each checkpoint's trainer state, so a
    resumed run judges its steps exactly as the uninterrupted one would.

    `PretrainingTrainer` feeds it each step's global loss (`step_loss`); `spike` holds the last spike
    ({"spike_step", "loss", "window_mean", "zscore"}) once training stopped on one. `skip_ahead`: steps after the
    spike whose blocks the rollback screens too (0: as many as lie between the checkpoint and the spike).
    `restart_at`: checkpoint steps from which the window starts empty (a shift re-baselined it).
    """

    def __init__(self, zscore: float, window: int = 50, skip_ahead: int = 0):
        if skip_ahead < 0:
            raise ValueError(f"loss_spike_skip_ahead: must be >= 0, got {skip_ahead}")
        if zscore <= 0:
            raise ValueError(f"loss_spike_zscore: must be > 0, got {zscore}")
        if window < 2:
            raise ValueError(f"loss_spike_window: must be >= 2 steps, got {window}")
        self.zscore, self.window, self.skip_ahead = zscore, window, skip_ahead
        self.losses: list[float] = []
        self.spike: dict[str, Any] | None = None
        self.step_loss: Callable[[], float] | None = None
        self.restart_at: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.losses = [float(x) for x in saved.get("attributes", {}).get("losses", self.losses)]
        if state.global_step in self.restart_at:  # the data shifted after this checkpoint: learn it anew
            self.losses = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_loss is None:
            raise RuntimeError("LossSpikeCallback: no step loss; use it with PretrainingTrainer(loss_spikes=...)")
        loss = self.step_loss()
        if not math.isfinite(loss):
            return control
        if len(self.losses) >= self.window:
            mean = statistics.fmean(self.losses)
            spread = max(statistics.pstdev(self.losses), 1e-6)
            score = (loss - mean) / spread
            if score > self.zscore:
                self.spike = {"spike_step": state.global_step, "loss": loss, "window_mean": mean, "zscore": score}
                control.should_training_stop = True
                control.should_save = control.should_evaluate = False  # nothing of this step is kept
                return control
        self.losses = (self.losses + [loss])[-self.window:]
        return control

    def state(self) -> dict[str, Any]:
        return {"args": {"zscore": self.zscore, "window": self.window}, "attributes": {"losses": self.losses}}


class RollbackError(ConfigError):
    """Training cannot go on past a loss spike; the message is the one line to print."""


def global_mean(value: torch.Tensor) -> float:
    """`value` averaged over all ranks (every rank must call this)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        value = value.detach().clone().float()
        torch.distributed.all_reduce(value)
        return float(value) / torch.distributed.get_world_size()
    return float(value)


MIN_RELATIVE_SPREAD = 0.02  # a reference spread below 2% of its median loss is taken as 2%: no hair trigger
REFERENCE_BLOCKS = 64  # blocks trained just before the checkpoint that set the line
SHARED_RISE = 1.0  # robust standard deviations the spiking step's ordinary blocks may rise before it is a shift


def judge_blocks(reference: list[float], candidates: dict[int, float], zscore: float
                 ) -> tuple[float, float, list[int]]:
    """(reference median, robust standard deviation, anomalous blocks): a block is anomalous when its loss lies more
    than `zscore` robust standard deviations (1.4826 x the median absolute deviation) above the median loss of
    `reference`, blocks the run trained on just before. Median and MAD: a few odd reference blocks do not move the
    line."""
    center = statistics.median(reference)
    spread = 1.4826 * statistics.median(abs(loss - center) for loss in reference)
    spread = max(spread, MIN_RELATIVE_SPREAD * abs(center), 1e-6)
    return center, spread, sorted(block for block, loss in candidates.items() if loss > center + zscore * spread)


def screen(trainer, checkpoint: str, spike_step: int, detector: LossSpikeCallback) -> dict[str, Any]:
    """Score blocks from the weights of `checkpoint` and decide what the spike was (see the module docstring):
    {"decision": "skip" | "shift", "why", "skipped_blocks", "resumed_from_step", "screened_steps",
    "reference_block_loss", "block_threshold", "anomalous_blocks", "top_block_loss"}. Every rank calls it (the
    scoring is shared)."""
    sampler, resumed = trainer.step_sampler, saved_step(Path(checkpoint))
    span = spike_step - resumed
    last_step = len(sampler.steps)
    trainer.load_checkpoint_weights(checkpoint)
    # About REFERENCE_BLOCKS blocks from the steps just before the checkpoint (at least `span` steps, at most a window)
    per_step = len(sampler.blocks_of_steps(resumed, resumed))
    back = min(detector.window, max(span, math.ceil(REFERENCE_BLOCKS / per_step)))
    reference = trainer.block_losses(sampler.blocks_of_steps(max(1, resumed - back + 1), resumed))
    losses: dict[int, float] = {}
    first, last = resumed + 1, min(spike_step + (detector.skip_ahead or span), last_step)
    while True:
        losses.update(trainer.block_losses(sampler.blocks_of_steps(first, last)))
        center, spread, anomalous = judge_blocks(list(reference.values()), losses, detector.zscore)
        bad_tail = set(anomalous) & set(sampler.blocks_of_steps(last, last))
        # Past the spike until a step reads no bad block; a rise lasting a whole window is the data's new normal.
        if not bad_tail or last >= min(spike_step + detector.window, last_step):
            break
        first, last = last + 1, min(last + span, spike_step + detector.window, last_step)
    # The bad blocks explain the spike unless the spiking step's ordinary blocks share its rise: their mean lies
    # more than SHARED_RISE spreads above the reference and, as a mean of that many, `zscore` standard errors.
    ordinary = [losses[b] for b in sampler.blocks_of_steps(spike_step, spike_step) if b not in anomalous]
    rise = statistics.fmean(ordinary) - center if ordinary else 0.0
    shared = rise > SHARED_RISE * spread and rise * math.sqrt(len(ordinary)) / spread > detector.zscore
    lasting = bool(bad_tail) and last >= spike_step + detector.window
    shift = not anomalous or shared or lasting
    why = ("no block stands out" if not anomalous else
           f"the ordinary blocks of step {spike_step} share the rise" if shared else f"the rise lasts past step {last}")
    return {"decision": "shift" if shift else "skip", "skipped_blocks": [] if shift else anomalous,
            "why": why if shift else f"{len(anomalous)} blocks stand out",
            "resumed_from_step": resumed, "screened_steps": [resumed + 1, last], "reference_block_loss": center,
            "block_threshold": center + detector.zscore * spread, "anomalous_blocks": len(anomalous),
            "top_block_loss": max(losses.values())}


def train_with_rollbacks(make_trainer: Callable[[DataState], Any], resume: str | None, max_rollbacks: int,
                         announce: Callable[[str], None] = print) -> tuple[Any, Any]:
    """`make_trainer(data_state).train(resume)`, again from the last good checkpoint after each loss spike, with
    the bad blocks the screen found skipped or, for a shift in the data, the detector re-baselined; returns
    (trainer, train output). After `max_rollbacks` rollbacks (counted over the whole run, resumes included), or
    with no checkpoint before a spike, a `RollbackError`."""
    data_state = DataState()
    while True:
        trainer = make_trainer(data_state)
        result = trainer.train(resume_from_checkpoint=resume)
        detector = trainer.loss_spikes
        spike = detector.spike if detector is not None else None
        if spike is None:
            return trainer, result
        data_state = trainer.data_state
        step = spike["spike_step"]
        what = f"loss spike at step {step} (loss {spike['loss']:.4f}, {spike['zscore']:.1f} standard deviations " \
               f"above the mean {spike['window_mean']:.4f} of the last {detector.window} steps)"
        if len(data_state.rollbacks) >= max_rollbacks:
            raise RollbackError(f"training stopped: {what}, after {len(data_state.rollbacks)} rollbacks already "
                                f"(max_rollbacks {max_rollbacks}); see {trainer.args.output_dir}")
        checkpoint = latest_complete_checkpoint(trainer.args.output_dir, before_step=step)
        if checkpoint is None:
            raise RollbackError(f"training stopped: {what}, and no checkpoint before it to roll back to "
                                f"(save_steps {trainer.args.save_steps})")
        found = screen(trainer, checkpoint, step, detector)
        blocks = found.pop("skipped_blocks")
        data_state.skipped |= set(blocks)
        data_state.rollbacks.append({**spike, "rollback": len(data_state.rollbacks) + 1,
                                     "skipped_blocks": block_ranges(blocks), **found})
        first, last = found["screened_steps"]
        judged = (f"scored the blocks of steps {first}-{last} from its weights against a threshold of "
                  f"{found['block_threshold']:.4f} (median {found['reference_block_loss']:.4f} before it)")
        if found["decision"] == "skip":
            message = f"{what}: rolling back to {Path(checkpoint).name}; {judged}: skipping the " \
                      f"{len(blocks)} blocks above it ({', '.join(f'{a}-{b - 1}' for a, b in block_ranges(blocks))})"
        else:
            message = f"{what}: rolling back to {Path(checkpoint).name}; {judged}: {found['why']}, a shift in the " \
                      f"data: nothing skipped, the spike test starts over from step {found['resumed_from_step']}"
        if trainer.is_world_process_zero():
            announce(f"[pretrain] {message}")
        del trainer, result
        gc.collect()
        resume = checkpoint
