"""Loss spikes that recover by themselves: detect one, go back to the last good checkpoint, skip the data since.

    detector = LossSpikeCallback(zscore=6.0, window=50)
    trainer, result = train_with_rollbacks(make_trainer, resume, max_rollbacks=3)

A step's loss (the mean over the whole global batch) is a spike when it lies more than `zscore` standard
deviations above the mean of the previous `window` steps' losses. The detector then stops training at that
step without saving. `train_with_rollbacks` builds a fresh trainer that resumes from the newest intact
checkpoint before the spike and never reads the blocks of the steps from that checkpoint to the spike (and
`skip_ahead` steps beyond) again
(`DataState`, saved as `data_state.json` in every later checkpoint, so a resume after the rollback is exact
too). PaLM (Chowdhery et al. 2022) handled its spikes this way by hand: restart about 100 steps before the
spike and skip 200-500 batches. Here the window skipped is exactly the steps since the checkpoint, so how far
back a rollback goes is `save_steps`.
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
from training.checkpoints import latest_complete_checkpoint
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
    ({"spike_step", "loss", "window_mean", "zscore"}) once training stopped on one. `skip_ahead`: a rollback
    also skips the data of this many steps after the spike (bad data tends to come in runs; PaLM skipped
    200-500 batches).
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

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.losses = [float(x) for x in saved.get("attributes", {}).get("losses", self.losses)]

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


def train_with_rollbacks(make_trainer: Callable[[DataState], Any], resume: str | None, max_rollbacks: int,
                         announce: Callable[[str], None] = print) -> tuple[Any, Any]:
    """`make_trainer(data_state).train(resume)`, again from the last good checkpoint after each loss spike, with
    the blocks since that checkpoint skipped; returns (trainer, train output). After `max_rollbacks`
    rollbacks (counted over the whole run, resumes included), or with no checkpoint before a spike, a
    `RollbackError`."""
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
        resumed_step = int(Path(checkpoint).name.rsplit("-", 1)[1])
        last = min(step + detector.skip_ahead, len(trainer.step_sampler.steps))
        blocks = trainer.step_sampler.blocks_of_steps(resumed_step + 1, last)
        data_state.skipped |= set(blocks)
        data_state.rollbacks.append({**spike, "rollback": len(data_state.rollbacks) + 1,
                                     "resumed_from_step": resumed_step, "skipped_blocks": block_ranges(blocks)})
        message = f"{what}: rolling back to {Path(checkpoint).name}, skipping the {len(blocks)} blocks of " \
                  f"steps {resumed_step + 1}-{last}"
        if trainer.is_world_process_zero():
            announce(f"[pretrain] {message}")
        del trainer, result
        gc.collect()
        resume = checkpoint
