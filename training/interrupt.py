"""Ctrl-C as a terminal user expects it: the run ends with one line saying where it stopped and how to resume.

During training the first Ctrl-C lets the current optimizer step finish, saves a checkpoint of it and stops
(`StopOnInterrupt`), so nothing is lost and the resume is exact; a second Ctrl-C stops at once. Anywhere else
(loading data, the final evaluation and save) Ctrl-C stops at once. Either way the recipe prints one line
(`report_interrupt`) instead of a traceback, and exits with the shell's code for SIGINT.

Only a single-process run takes over Ctrl-C: under `accelerate launch` / `torchrun` the terminal's SIGINT reaches
the launcher, which ends the ranks itself.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from cli import INTERRUPTED, is_main_process
from training.checkpoints import latest_complete_checkpoint, saved_step


class _CtrlC:
    requested = False


def interrupted() -> bool:
    """Whether a Ctrl-C stopped the last training (`StopOnInterrupt`)."""
    return _CtrlC.requested


def _request_stop(signum, frame) -> None:
    if _CtrlC.requested:
        raise KeyboardInterrupt
    _CtrlC.requested = True
    print("\nCtrl-C: stopping after this step with a checkpoint of it (Ctrl-C again stops at once)",
          file=sys.stderr, flush=True)


class StopOnInterrupt(TrainerCallback):
    """The first Ctrl-C ends training after the current optimizer step, with a checkpoint of that step."""

    def on_train_begin(self, args, state, control, **kwargs):
        _CtrlC.requested = False
        if (args.world_size == 1 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _request_stop)):
            signal.signal(signal.SIGINT, _request_stop)

    def on_step_end(self, args, state, control, **kwargs):
        if _CtrlC.requested:
            control.should_save = True  # whatever the save strategy: this step's work is kept
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if signal.getsignal(signal.SIGINT) is _request_stop:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def report_interrupt(output_dir: str, resumes_itself: bool = False) -> int:
    """Print where a Ctrl-C stopped the run and which checkpoint resumes it; returns `INTERRUPTED`."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if is_main_process():
        if checkpoint is None:
            line = "stopped by Ctrl-C before the first checkpoint: the same command starts over"
        else:
            how = "the same command resumes from it" if resumes_itself else (
                "the same command with --resume_from_checkpoint=auto resumes from it")
            line = f"stopped by Ctrl-C: newest checkpoint {checkpoint} (step {saved_step(Path(checkpoint))}); {how}"
        print(line, file=sys.stderr, flush=True)
    return INTERRUPTED


def stop_quietly(main: Callable[[], int]) -> int:
    """`main()`, with a Ctrl-C that it does not handle itself (before training) reported in one line."""
    try:
        return main()
    except KeyboardInterrupt:
        if is_main_process():
            print("stopped by Ctrl-C before training began", file=sys.stderr, flush=True)
        return INTERRUPTED
