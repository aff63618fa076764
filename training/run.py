"""The run shell the training recipes share: everything around a recipe's own story of parse, data, model, train
and finish.

    @recipe_main
    def main(argv=None, *, config=None, overrides=None) -> int:
        args, ... = parse(...)                  # setup: a bad setting raises ConfigError / ValueError / OSError
        trainer = ...
        return train_and_finish(args, "pretrain", train=lambda resume: trainer.train(resume), finish=...)

    if __name__ == "__main__":
        run_from_command_line(main)

- `recipe_main`: the process is a launched rank (`as_launched_rank`), and a bad setting met before training is one
  `error:` line with exit status 2, not a traceback.
- `train_and_finish`: one run per output folder (its lock, held through the finish, whose saving and reports belong
  to the run), the checkpoint to resume from (`resume_from_checkpoint`, "auto" the newest complete one), then
  `finish(train(resume))`; a Ctrl-C ends in one line naming the checkpoint that resumes it, a `ConfigError` (a busy
  folder, a broken checkpoint, a full disk) in one `error:` line. The trainers need `StopOnInterrupt`.
- `run_from_command_line`: a recipe run as a script, with the exit status a launcher reads from each rank.
- `keep_freed_memory`: the C allocator keeps freed blocks for the next step (`recipe_main` sets it).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments

from cli import ConfigError, report_error
from training.checkpoints import as_launched_rank, exit_rank, output_dir_lock, resolve_resume, saved_step
from training.interrupt import interrupted, report_interrupt, stop_quietly

SETUP_ERRORS = (ConfigError, ValueError, OSError)  # what a bad setting, a missing file or bad data raise


class _Training:
    started = False  # from here on an error is the run's, with its traceback, not a setting's


# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Has glibc's allocator keep freed memory for reuse; returns whether it applied (glibc only, else a no-op).

    By default glibc serves every block above its mmap threshold (32 MiB at most) with fresh pages from the kernel
    and hands them back when the block is freed. A step's logits (batch x sequence x vocabulary floats: 34 MB for
    the quickstart's 4 x 512 x 4,096) and its activations are such blocks, so every step faulted in and zeroed them
    again, 4 KiB at a time (38,000 page faults per quickstart step). With blocks under `limit` taken from the heap
    and up to `limit` of free heap kept, the quickstart's pretraining steps take 0.85x the time and its held-out
    scoring 0.80x, with the same numbers (benchmarks/results/allocator_cpu.md). Freed memory up to `limit` stays
    with the process.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt is not glibc's
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


def recipe_main(main: Callable[..., int]) -> Callable[..., int]:
    """`main` as a launched rank, with the setup errors raised before `train_and_finish` as one `error:` line."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        as_launched_rank()
        keep_freed_memory()
        _Training.started = False
        try:
            return main(*args, **kwargs)
        except SETUP_ERRORS as err:
            if _Training.started:
                raise
            return report_error(err)

    return run


def train_and_finish(args: TrainingArguments, name: str, *, train: Callable[[str | None], Any],
                     finish: Callable[[Any], int]) -> int:
    """`finish(train(resume))` under the output folder's lock; returns the exit status."""
    _Training.started = True
    main_process = args.process_index == 0
    resumes_itself = args.resume_from_checkpoint == "auto"
    try:
        with output_dir_lock(args.output_dir, enabled=main_process):
            resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
            if main_process and resumes_itself and resume is None:
                print(f"[{name}] no checkpoint in {args.output_dir} to resume from: starting at step 0", flush=True)
            if main_process and resume:
                print(f"[{name}] resuming from {resume} (step {saved_step(Path(resume))})", flush=True)
            result = train(resume)
            if interrupted():
                return report_interrupt(args.output_dir, resumes_itself)
            return finish(result)
    except ConfigError as err:
        return report_error(err)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
        return report_interrupt(args.output_dir, resumes_itself)


def run_from_command_line(main: Callable[[], int]) -> None:
    """Run a recipe's `main` as a script: TF32-class matmuls where the device has them, transformers' warnings
    only, a Ctrl-C before training as one line, and each rank's exit status (`exit_rank`)."""
    torch.set_float32_matmul_precision("high")
    transformers.logging.set_verbosity_warning()
    exit_rank(stop_quietly(main))
