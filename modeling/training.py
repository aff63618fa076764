"""Pieces that plug Ember pretraining into the Hugging Face `Trainer`.

- `PretrainingTrainer`: the Trainer, whose own AdamW decays weight matrices only (`decay_parameter_names`).
- `collate_packed`: batches of `data_prep.token_dataset.PackedDataset` examples.
- `ThroughputCallback` (+ `device_peak_flops`): tokens/s, TFLOP/s per device, MFU and peak memory in the logs.
- `NonFiniteGuardCallback`: skips optimizer steps whose gradients hold NaN/inf and stops after a run of them.
- `lr_scheduler_kwargs`: our schedule names ("cosine", "wsd") as `TrainingArguments` scheduler settings.
- `latest_complete_checkpoint`: the checkpoint to resume from, passing over one a kill left half-written.

Typical wiring::

    model.config.use_cache = False  # a KV cache in the forward pass turns off document masking
    args = TrainingArguments(..., remove_unused_columns=False)  # keep "shift_labels" in the examples
    guard = NonFiniteGuardCallback()
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_packed,
                                 callbacks=[ThroughputCallback(...), guard])
    trainer.train()
    if guard.stop_reason: ...

Besides the standard library this imports only torch, transformers (with its Trainer) and `modeling.sizing`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .sizing import peak_flops_for_device

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that get weight decay: the weight matrices of linear maps.

    A parameter decays when it has two or more dimensions and does not belong to an `nn.Embedding`. That
    covers the attention and MLP projections, an untied `lm_head`, the MoE router and the MoE experts'
    stacked (3-D) matrices. Left out: every 1-D parameter (norm weights, norm and projection biases), token
    embeddings and learned position embeddings. Embeddings are exempt as in OLMo 2: AdamW's decoupled decay
    shrinks every row at every step, while a token's row gets gradient only in batches where the token
    occurs, so rare tokens' rows would drift towards zero.

    Tied weights: `named_parameters()` yields a shared tensor once, and an `lm_head` tied to the token
    embedding *is* the embedding's parameter, so it is exempt as an embedding. Both readings are defensible
    (the matrix is also the output projection); we follow the input role, since the embedding is the
    parameter the tie points to and its rows for rare tokens are the ones decay would erode.

    Under FSDP the Trainer refuses a ready-made optimizer; a Trainer subclass can return this list from
    `get_decay_parameter_names` to get the same split from the Trainer's own AdamW.
    """
    embedding_ids = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
                     for p in module.parameters(recurse=False)}
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and id(p) not in embedding_ids]


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: [{decayed matrices, weight_decay}, {everything else, 0.0}].

    Every trainable parameter lands in exactly one group, shared (tied) tensors once; frozen parameters in
    neither. See `decay_parameter_names` for the rule.
    """
    decayed = set(decay_parameter_names(model))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if name in decayed else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


STREAM_STATE_FILE = "stream_state_{rank}.json"


def is_rank_stream(dataset: Any) -> bool:
    """An iterable dataset with `state_dict()`/`load_state_dict()` (e.g. `StreamingPackedDataset`)."""
    return (isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "state_dict")
            and hasattr(dataset, "load_state_dict"))


class PretrainingTrainer(Trainer):
    """The HF Trainer with Ember's weight-decay split (`decay_parameter_names`) and callback metrics in its logs.

    The Trainer builds the optimizer itself (`args.optim`, fused AdamW where available), so this works
    the same under DDP, FSDP (which refuses a ready-made optimizer) and DeepSpeed.

    Each periodic training log (the one with "loss") also gets the metrics of every callback that has a
    `training_log_metrics()` method (`ThroughputCallback`, `NonFiniteGuardCallback`), added before the log
    is recorded in `log_history` and handed to the printer and the reporters (TensorBoard, trackio, W&B).

    A stateful stream as `train_dataset` (`is_rank_stream`; each rank passes its own share, e.g. built on
    `data_prep.token_dataset.open_document_stream`) is read by a plain per-rank DataLoader: accelerate's
    would have rank 0 read for everyone or every rank read everything, and it reads a batch ahead. Each
    checkpoint holds every rank's stream state (`stream_state_<rank>.json`, written with the RNG state,
    before `trainer_state.json` marks the checkpoint complete), and a resumed run continues the stream from
    it instead of re-reading and dropping the consumed batches.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if is_rank_stream(self.train_dataset):
            if self.args.dataloader_num_workers:
                raise ValueError("dataloader_num_workers: must be 0 for a streaming train dataset (its resume state "
                                 "lives in the main process)")
            self.args.ignore_data_skip = True  # the stream's own state replaces skip-by-re-reading

    def get_train_dataloader(self) -> DataLoader:
        if not is_rank_stream(self.train_dataset):
            return super().get_train_dataloader()
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def _stream_state_path(self, checkpoint: str | os.PathLike) -> Path:
        return Path(checkpoint) / STREAM_STATE_FILE.format(rank=self.args.process_index)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if is_rank_stream(self.train_dataset):
            path = self._stream_state_path(output_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.train_dataset.state_dict()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and is_rank_stream(self.train_dataset):
            path = self._stream_state_path(checkpoint)
            if not path.is_file():
                raise ValueError(f"{path}: missing; resume a streaming run from a checkpoint of a streaming run "
                                 f"with the same number of ranks ({self.args.world_size})")
            self.train_dataset.load_state_dict(json.loads(path.read_text()))

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP2's fully_shard swaps the model's class for a subclass made inside torch (FSDPEmberForCausalLM);
        # save_pretrained would copy that torch module as the model's code and point auto_map at it, and the
        # folder would not load. The Trainer hands a gathered state dict here, so save under the model's own class.
        from torch.distributed.fsdp import FSDPModule

        model = self.accelerator.unwrap_model(self.model)
        sharded_class = type(model)
        if not isinstance(model, FSDPModule):
            return super()._save(output_dir, state_dict)
        model.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            return super()._save(output_dir, state_dict)
        finally:
            model.__class__ = sharded_class

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied output head is not in the checkpoint (it is the embedding), so every resume of a tied model
        # "misses" it; the Trainer re-ties silently only for models listing it in `_keys_to_ignore_on_save`,
        # and warns for all others (stock Llama included). Tied keys are not missing: re-tie, warn about the rest.
        model = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) < len(load_result.missing_keys):
            model.tie_weights()
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "training_log_metrics"):
                    logs.update(callback.training_log_metrics())
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def collate_packed(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack `PackedDataset` examples into a batch for `EmberForCausalLM` under the Trainer.

    Returns {"input_ids", "labels", "shift_labels"[, "position_ids"]}, each (batch, seq_len) and contiguous.
    The loss reads `shift_labels` (already shifted, so all seq_len positions are targets); `labels` holds
    the same values because the model computes a loss only when `labels` is given and the Trainer counts
    `num_items_in_batch` (the gradient-accumulation normaliser) only for batches that have it. It is a
    separate copy: code that edits or shards batch tensors in place (context parallelism does) must not
    touch one tensor twice. No attention mask: with `position_ids` and no KV cache, transformers masks
    attention across document boundaries itself.
    """
    if not examples:
        raise ValueError("collate_packed: no examples")
    keys = examples[0].keys()
    if "shift_labels" not in keys:
        # The Trainer drops example keys that `forward` does not name unless told not to.
        raise ValueError(f"collate_packed: examples have no 'shift_labels' (keys: {sorted(keys)}); "
                         "set TrainingArguments(remove_unused_columns=False)")
    if any(example.keys() != keys for example in examples):
        raise ValueError("collate_packed: examples have different keys (mixed return_position_ids?)")
    shift_labels = torch.stack([example["shift_labels"] for example in examples])
    batch = {
        "input_ids": torch.stack([example["input_ids"] for example in examples]),
        "labels": shift_labels.clone(),
        "shift_labels": shift_labels,
    }
    if "position_ids" in keys:
        batch["position_ids"] = torch.stack([example["position_ids"] for example in examples])
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


def device_peak_flops(override: float | None = None) -> float | None:
    """Peak dense BF16 FLOP/s of the current CUDA device, `override` if given, None if unknown or on CPU."""
    if override is not None:
        return float(override)
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_device(torch.cuda.get_device_name())


def peak_memory_gb() -> float | None:
    """Peak memory of this process in GiB: CUDA allocations on the current device, else peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource  # Unix only
    except ImportError:
        return None
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**30 if sys.platform == "darwin" else max_rss * 1024 / 2**30  # bytes on macOS, KiB on Linux


def _synchronize_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class ThroughputCallback(TrainerCallback):
    """Measures `tokens_per_s`, `tflops_per_device`, `mfu` and `peak_memory_gb` for each training log.

    `PretrainingTrainer` adds them to its training logs (`training_log_metrics`).

    Time is wall-clock between the ends of consecutive optimizer steps (data loading included), averaged
    over the steps since the previous log. The first `warmup_steps` steps of a run (compilation, allocator
    warm-up, a resumed run's data skipping) are left out; time spent in evaluation and checkpointing is too.
    On CUDA each step end waits for the device, so a step's time is its real duration; this costs little
    next to a training step (and `NonFiniteGuardCallback` synchronises every step anyway).

    Args:
        flops_per_token: training FLOPs per token (`modeling.sizing.flops_per_token`).
        tokens_per_step: tokens in one optimizer step across all devices
            (per-device batch x accumulation x data-parallel ranks x seq_len).
        peak_flops_per_device: peak FLOP/s of one device for MFU (`device_peak_flops`); None: no `mfu`.
        num_devices: devices sharing `tokens_per_step`.
        warmup_steps: leading steps excluded from the measurement.

    `tokens_per_s` is for the whole job; `tflops_per_device` = flops_per_token x tokens_per_s / num_devices
    / 1e12 and `mfu` = that / peak (model FLOPs, PaLM's definition, so recomputation does not count).
    """

    def __init__(self, flops_per_token: float, tokens_per_step: int, peak_flops_per_device: float | None,
                 num_devices: int, warmup_steps: int = 2):
        if num_devices < 1 or tokens_per_step < 1 or warmup_steps < 0:
            raise ValueError("ThroughputCallback: num_devices and tokens_per_step must be >= 1, warmup_steps >= 0")
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.peak_flops_per_device = peak_flops_per_device
        self.num_devices = num_devices
        self.warmup_steps = warmup_steps
        self.clock = time.perf_counter  # seconds; replaceable, e.g. by a scripted clock
        self._reset()

    def _reset(self) -> None:
        self._steps_seen = 0
        self._last_step_end: float | None = None
        self._window_seconds = 0.0
        self._window_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize_cuda()
        now = self.clock()
        self._steps_seen += 1
        if self._steps_seen > self.warmup_steps and self._last_step_end is not None:
            self._window_seconds += now - self._last_step_end
            self._window_steps += 1
        self._last_step_end = now

    def _restart_clock(self) -> None:
        # The next step is timed from here, so the evaluation or save that just finished is not counted.
        if self._last_step_end is not None:
            _synchronize_cuda()
            self._last_step_end = self.clock()

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_clock()

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock()

    def training_log_metrics(self) -> dict[str, float]:
        """Metrics over the steps since the last call (empty if none were timed); starts a new window."""
        if self._window_steps == 0 or self._window_seconds <= 0:
            return {}
        tokens_per_s = self._window_steps * self.tokens_per_step / self._window_seconds
        flops_per_device = self.flops_per_token * tokens_per_s / self.num_devices
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12}
        if self.peak_flops_per_device:
            metrics["mfu"] = flops_per_device / self.peak_flops_per_device
        memory = peak_memory_gb()
        if memory is not None:
            metrics["peak_memory_gb"] = memory
        self._window_seconds, self._window_steps = 0.0, 0
        return metrics



def _any_non_finite(grads: list[torch.Tensor], device: torch.device | str) -> bool:
    """Whether any gradient anywhere (all ranks) holds NaN or inf, with one reduction and one host sync."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor shards (FSDP2)
    if local:
        # One fused norm per tensor: a NaN or inf element makes its tensor's norm non-finite.
        norms = [norm.float().to(device) for norm in torch._foreach_norm(local)]
        flag = (~torch.stack(norms).isfinite()).any().float()
    else:
        flag = torch.zeros((), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # Every rank must take the same decision, and under FSDP each one sees only its own shards.
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class NonFiniteGuardCallback(TrainerCallback, ExportableState):
    """Skips optimizer steps whose gradients contain NaN or inf, and stops training after a run of them.

    Just before each optimizer step (after gradient clipping) the gradients are checked; if any is
    non-finite, every `param.grad` is set to None. torch's optimizers pass over parameters without a
    gradient, so the step changes neither the weights nor AdamW's moments and step counts (weight decay
    included); the learning-rate schedule still advances. `skipped_steps` counts the skipped steps;
    `PretrainingTrainer` adds it to every training log. The counts are saved in each checkpoint's
    `trainer_state.json` and taken up again by a resumed run.

    After `max_consecutive` skipped steps in a row the run is beyond a transient spike: the callback asks
    the Trainer to save a checkpoint at that step (the weights are those from before the run of skips) and
    to stop, and sets `stop_reason`; the caller should report it and exit with a failure status.

    Gradients are read from `param.grad`. Under DeepSpeed they live inside the engine, the guard sees none
    and stays idle (it warns once).
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive: must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self.stop_reason: str | None = None
        self._warned_no_gradients = False

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads and not self._warned_no_gradients:
            logger.warning("NonFiniteGuardCallback: no gradients visible on the parameters; steps are not checked")
            self._warned_no_gradients = True
        if not _any_non_finite(grads, args.device):
            self.consecutive = 0
            return
        for param in params:
            param.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        step = state.global_step + 1  # the step being taken; global_step counts the finished ones
        logger.warning("step %d: non-finite gradients, optimizer step skipped (%d in a row, %d in total)",
                       step, self.consecutive, self.skipped_steps)
        if self.consecutive >= self.max_consecutive:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            self.stop_reason = (f"training stopped: {self.consecutive} consecutive steps had non-finite gradients "
                                f"(last at step {step}); the last checkpoint is in {checkpoint}")
            logger.error(self.stop_reason)
            control.should_save = True
            control.should_training_stop = True
        return control

    def training_log_metrics(self) -> dict[str, float]:
        return {"skipped_steps": self.skipped_steps}

    def state(self) -> dict[str, Any]:
        return {"args": {"max_consecutive": self.max_consecutive},
                "attributes": {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's state comes from the checkpoint's trainer_state.json; a fresh run's holds our zeros.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self.skipped_steps = int(attributes.get("skipped_steps", self.skipped_steps))
            self.consecutive = int(attributes.get("consecutive", self.consecutive))


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "wsd")


def lr_scheduler_kwargs(schedule: str, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                        max_steps: int | None = None) -> tuple[str, dict[str, Any]]:
    """(`lr_scheduler_type`, `lr_scheduler_kwargs`) for `TrainingArguments` from one of our schedule names.

    Warmup is linear and set as usual through `warmup_steps` / `warmup_ratio`.

    - "cosine": cosine decay from the peak to `min_lr_ratio` x peak at the last step (transformers'
      "cosine_with_min_lr").
    - "wsd": warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, a constant peak, then a decay to
      `min_lr_ratio` x peak over the last `decay_fraction` of `max_steps` (transformers'
      "warmup_stable_decay", which needs the decay length in steps, hence `max_steps`). The decay follows
      1 - sqrt(progress), a cooldown Hägele et al. 2024 found better than a linear one. transformers starts
      this schedule's warmup at `min_lr_ratio` x peak rather than at zero.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
    if schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": min_lr_ratio}
    if schedule == "wsd":
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {decay_fraction}")
        if max_steps is None or max_steps < 1:
            raise ValueError(f"max_steps: the 'wsd' schedule needs the total number of steps, got {max_steps}")
        num_decay_steps = max(1, round(decay_fraction * max_steps))
        return "warmup_stable_decay", {"num_decay_steps": num_decay_steps, "min_lr_ratio": min_lr_ratio,
                                       "decay_type": "1-sqrt"}
    raise ValueError(f"schedule: unknown name {schedule!r}; choose one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _saved_step(checkpoint: Path) -> int | None:
    """The global step recorded in the checkpoint's trainer state; None when the file is missing or cut short."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state.get("global_step") if isinstance(state, dict) else None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that a resume can trust, or None if there is none.

    For `--resume_from_checkpoint=auto`, in place of `transformers.trainer_utils.get_last_checkpoint`,
    which goes by the folder name alone. The Trainer writes a checkpoint in place, not to a staging folder
    renamed at the end: the main process writes the model files, the optimizer, the scheduler and its RNG
    state, and `trainer_state.json` last. A kill in between leaves a `checkpoint-N` folder holding part of
    that; resuming from it, `Trainer.train` stops on the missing trainer state (or a truncated file), and so
    does every later automatic resume until someone deletes the folder. Here a checkpoint counts when its
    `trainer_state.json` is valid JSON whose `global_step` is the N in the folder's name: written last, it
    vouches for the files before it. A save never touches earlier checkpoints (the `save_total_limit`
    rotation deletes old folders only after the new trainer state is written), so a kill mid-save sends the
    resume one checkpoint back, and the resumed run rewrites the partial folder when it gets there.

    Not checked: the other ranks' `rng_state_<rank>.pth`, which they write with no barrier to the main
    process. The world size the checkpoint was written with is not recorded, and requiring the resuming
    run's ranks would reject every checkpoint after a change of world size. A kill that catches a rank that
    far behind leaves its RNG file missing (the Trainer then resumes without that rank's RNG state, which
    only dropout would notice) or truncated (loading it fails with an error).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            candidates.append((int(match.group(1)), entry))
    for step, checkpoint in sorted(candidates, reverse=True):
        if _saved_step(checkpoint) == step:
            return str(checkpoint)
        logger.warning("%s is incomplete (no valid %s for step %d): not resuming from it",
                       checkpoint, TRAINER_STATE_NAME, step)
    return None


__all__ = [
    "NonFiniteGuardCallback",
    "SCHEDULES",
    "ThroughputCallback",
    "PretrainingTrainer",
    "collate_packed",
    "is_rank_stream",
    "decay_parameter_groups",
    "decay_parameter_names",
    "device_peak_flops",
    "latest_complete_checkpoint",
    "lr_scheduler_kwargs",
    "peak_memory_gb",
]
