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
"""

from __future__ import annotations

import functools
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


def recipe_main(main: Callable[..., int]) -> Callable[..., int]:
    """`main` as a launched rank, with the setup errors raised before `train_and_finish` as one `error:` line."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        as_launched_rank()
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
