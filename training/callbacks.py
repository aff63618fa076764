"""Trainer callbacks of a training run: readable log lines, throughput/MFU/memory, a guard against NaN/inf steps.

- `LogLinesCallback`: each log as one line of numbers (`step 10/200 | loss 7.216 | ...`), under a progress bar
  on a terminal and on its own when the output goes to a file; replaces the Trainer's progress printer.
- `ThroughputCallback` (+ `device_peak_flops`): tokens/s, TFLOP/s per device, MFU and peak memory.
- `NonFiniteGuardCallback`: skips optimizer steps whose gradients hold NaN/inf and stops after a run of them.
- `EtaCallback`: at a tenth, a quarter and half of the run, how long the rest takes, from the steps timed so far.

`PretrainingTrainer` adds each callback's `training_log_metrics()` to its training logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from data_prep.io import atomic_write_text
from modeling.sizing import format_duration, peak_flops_for_device

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)


def format_log(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One log entry as a line of numbers: `step 10/200 | loss 7.216 | grad_norm 1.23 | learning_rate 0.0003`."""
    parts = [f"step {step:,}/{max_steps:,}" if max_steps > 0 else f"step {step:,}"]
    for key, value in logs.items():
        if key in ("total_flos", "step"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parts.append(f"{key} {value}")
        elif isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
            parts.append(f"{key} {int(value):,}")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


class LogLinesCallback(ProgressCallback):
    """The Trainer's progress output, readable: each log is one line of numbers (the stock printer shows a dict
    of quoted strings), and the progress bar is drawn only on a terminal, where it can redraw in place; written
    to a file it would be one endless line, and the log lines are the progress there."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = 0
        if state.is_world_process_zero and sys.stderr.isatty() and not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.training_bar is not None:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


def use_log_lines(trainer) -> None:
    """Swap the Trainer's log printer (`ProgressCallback`, or `PrinterCallback` without tqdm) for `LogLinesCallback`."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLinesCallback)


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


class _StepTimer(TrainerCallback):
    """Keeps the end time of the last optimizer step (`_last_step_end`, by `clock`); an evaluation or checkpoint
    save moves it to its own end, so the next step is timed without them."""

    _last_step_end: float | None = None

    def _restart_clock(self) -> None:
        if self._last_step_end is not None:
            _synchronize_cuda()
            self._last_step_end = self.clock()

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_clock()

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock()


class ThroughputCallback(_StepTimer):
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
            (per-device batch x accumulation x data-parallel ranks x seq_len), or a function of the step
            number (1-based) when it varies (a batch-size warmup).
        peak_flops_per_device: peak FLOP/s of one device for MFU (`device_peak_flops`); None: no `mfu`.
        num_devices: devices sharing `tokens_per_step`.
        warmup_steps: leading steps excluded from the measurement.

    `tokens_per_s` is for the whole job; `tflops_per_device` = flops_per_token x tokens_per_s / num_devices
    / 1e12 and `mfu` = that / peak (model FLOPs, PaLM's definition, so recomputation does not count).
    """

    def __init__(self, flops_per_token: float, tokens_per_step: int | Callable[[int], int],
                 peak_flops_per_device: float | None, num_devices: int, warmup_steps: int = 2):
        if num_devices < 1 or (not callable(tokens_per_step) and tokens_per_step < 1) or warmup_steps < 0:
            raise ValueError("ThroughputCallback: num_devices and tokens_per_step must be >= 1, warmup_steps >= 0")
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step if callable(tokens_per_step) else (lambda step: tokens_per_step)
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
        self._window_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize_cuda()
        now = self.clock()
        self._steps_seen += 1
        if self._steps_seen > self.warmup_steps and self._last_step_end is not None:
            self._window_seconds += now - self._last_step_end
            self._window_steps += 1
            self._window_tokens += self.tokens_per_step(state.global_step)
        self._last_step_end = now

    def training_log_metrics(self) -> dict[str, float]:
        """Metrics over the steps since the last call (empty if none were timed); starts a new window."""
        if self._window_steps == 0 or self._window_seconds <= 0:
            return {}
        tokens_per_s = self._window_tokens / self._window_seconds
        flops_per_device = self.flops_per_token * tokens_per_s / self.num_devices
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_device": flops_per_device / 1e12}
        if self.peak_flops_per_device:
            metrics["mfu"] = flops_per_device / self.peak_flops_per_device
        memory = peak_memory_gb()
        if memory is not None:
            metrics["peak_memory_gb"] = memory
        self._window_seconds, self._window_steps, self._window_tokens = 0.0, 0, 0
        return metrics



class EtaCallback(_StepTimer):
    """Prints how long the rest of the run takes once `fractions` of its steps are done (a tenth, a quarter, a
    half), each time from the mean seconds per step so far, with a range, and keeps those estimates.

    The mean leaves out the first `warmup_steps` (allocator warm-up, a resumed run's data skipping) and the time
    of evaluations and checkpoint saves; the estimate is that mean times the steps left. A probe of a few steps
    before a run cannot promise this: on a shared machine the speed of a few seconds moves by +-15%, and the
    longer the window the closer the estimate (benchmarks/results/eta_check.md measures it). The range is the
    steps left at the pace of the window's fastest and of its slowest quarter: how far the machine's speed moved
    while it was watched. `estimates` holds them in order; the main process also writes them to `path` when
    given, for a report to set against the run's real duration. A fraction whose window would end at or after the
    last step gives none.
    """

    def __init__(self, fractions: tuple[float, ...] = (0.1, 0.25, 0.5), warmup_steps: int = 2, min_steps: int = 10,
                 path: Path | None = None):
        if not fractions or not all(0.0 < f < 1.0 for f in fractions) or warmup_steps < 0 or min_steps < 1:
            raise ValueError("EtaCallback: fractions must be in (0, 1), warmup_steps >= 0, min_steps >= 1")
        self.fractions, self.warmup_steps, self.min_steps, self.path = fractions, warmup_steps, min_steps, path
        self.clock = time.perf_counter  # replaceable, e.g. by a scripted clock
        self.estimates: list[dict[str, Any]] = []
        self._begin = self._first_step = None
        self._marks: dict[int, float] = {}  # step -> the fraction whose window ends there
        self._durations: list[float] = []  # of the timed steps, in order

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin, self._last_step_end, self._durations, self.estimates = self.clock(), None, [], []
        self._first_step = state.global_step + self.warmup_steps  # the last step left out of the timing
        left = state.max_steps - self._first_step
        self._marks = {}
        for fraction in sorted(self.fractions, reverse=True):  # where two windows end together, the smaller names it
            self._marks[self._first_step + max(self.min_steps, round(fraction * left))] = fraction

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize_cuda()
        now = self.clock()
        if self._last_step_end is not None and self._first_step < state.global_step <= max(self._marks, default=0):
            self._durations.append(now - self._last_step_end)
        self._last_step_end = now
        if state.global_step in self._marks and state.global_step < state.max_steps and self._durations:
            step_seconds = sum(self._durations) / len(self._durations)
            ends = [round(i * len(self._durations) / 4) for i in range(5)]  # the window's quarters
            paces = [sum(self._durations[a:b]) / (b - a) for a, b in zip(ends, ends[1:]) if b > a]
            left = state.max_steps - state.global_step
            low, high = left * min(paces), left * max(paces)
            self.estimates.append({
                "fraction": self._marks[state.global_step], "step_seconds": step_seconds,
                "window": [self._first_step + 1, state.global_step], "at_step": state.global_step,
                "elapsed_seconds": now - self._begin, "at_time": time.time(), "remaining_steps": left,
                "remaining_seconds": left * step_seconds, "remaining_range_seconds": [low, high]})
            if state.is_world_process_zero:
                print(f"[eta] {step_seconds:.3f} s per step over steps {self._first_step + 1}-{state.global_step}: "
                      f"the {left:,} steps left take ~{format_duration(left * step_seconds)} "
                      f"({format_duration(low)} to {format_duration(high)} at the pace of the window's "
                      "fastest and slowest quarter)", flush=True)
                if self.path is not None:
                    atomic_write_text(self.path, json.dumps({"estimates": self.estimates}, indent=2) + "\n")


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
