"""Checkpoints a run can trust, and one run per output folder.

- `latest_complete_checkpoint` / `resolve_resume`: which checkpoint a resumed run starts from; every file the
  Trainer will load is checked first (`checkpoint_problem`), so a cut-short file is named, not crashed on.
- `save_failure`: a checkpoint save that ran out of disk space, as one line naming the folder and the space needed.
- `output_dir_lock`: a run holds a lock on its `output_dir`; a second run writing the same folder is refused.
- `as_launched_rank` / `exit_rank`: launched ranks end when their launcher dies instead of training on
  unattended, leave their process group at exit, and end without interpreter finalization.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cli import ConfigError, honour_umask, is_main_process, warn

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LOCK_FILE = "run.lock"
FAILED_RANK_GRACE_S = 30  # at most; see exit_rank
# torch.save (optimizer, scheduler, RNG states, DeepSpeed partitions) writes zip archives under these names.
TORCH_ARCHIVE_SUFFIXES = (".pt", ".pth", ".bin")


def saved_step(checkpoint: Path) -> int | None:
    """The global step recorded in the checkpoint's trainer state; None when the file is missing or cut short."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state.get("global_step") if isinstance(state, dict) else None


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole: its header must parse and its tensors must end where the file ends."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        header_len = struct.unpack("<Q", head)[0]
        if 8 + header_len > size:
            return f"{size} bytes, shorter than its {header_len}-byte header (truncated)"
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "unreadable safetensors header"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        return f"{size} bytes, its header says {8 + header_len + data_end} (truncated)"
    return None


def _torch_archive_problem(path: Path) -> str | None:
    """Why a torch.save archive is not whole. Its zip directory is written last, so a cut-short file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a complete torch archive ({err}; truncated?)"
    if end > size:
        return f"{size} bytes, its directory says at least {end} (truncated)"
    return None


def _distcp_problem(folder: Path) -> str | None:
    """Why a torch.distributed.checkpoint folder (FSDP's sharded state) is not whole: every shard file must
    hold the byte ranges its `.metadata` assigns to it."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # an unpickling error of any kind: the file is cut short or garbled
        return f".metadata unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            return f"{name}: missing"
        if shard.stat().st_size < end:
            return f"{name}: {shard.stat().st_size} bytes, .metadata says at least {end} (truncated)"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What is wrong with a `checkpoint-N` folder, as "<file>: <why>", or None when it can be resumed from.

    Checked: `trainer_state.json` is valid JSON whose `global_step` is the N in the folder's name (the Trainer
    writes it last, so it vouches that the other files were started), every safetensors file's header and
    length, every torch archive (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, ...) has its zip directory
    (written last by torch.save, so a cut-short file has none), every other JSON file parses, and each
    torch.distributed.checkpoint folder (FSDP's sharded model and optimizer) holds the bytes its metadata names.
    Headers and sizes only: reading a few kilobytes per file, not the weights.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return f"{folder}: not a folder"
    match = _CHECKPOINT_NAME.match(folder.name)
    step = saved_step(folder)
    if step is None:
        return f"{folder / TRAINER_STATE_NAME}: missing or unreadable (the save did not finish)"
    if match and step != int(match.group(1)):
        return f"{folder / TRAINER_STATE_NAME}: records step {step}, not {match.group(1)}"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            if path.is_dir() and (path / ".metadata").is_file():
                problem = _distcp_problem(path)
                if problem:
                    return f"{path}/{problem}"
            continue
        if path.name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        elif path.name.endswith(TORCH_ARCHIVE_SUFFIXES):
            problem = _torch_archive_problem(path)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                problem = None
            except (UnicodeDecodeError, json.JSONDecodeError):
                problem = "unreadable JSON (truncated?)"
        else:
            continue
        if problem:
            return f"{path}: {problem}"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for name in sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())):
            if not (folder / name).is_file():
                return f"{folder / name}: missing (listed in {index.name})"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike, before_step: int | None = None) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that a resume can trust (with N < `before_step` if
    given), or None if there is none.

    For `--resume_from_checkpoint=auto`, in place of `transformers.trainer_utils.get_last_checkpoint`,
    which goes by the folder name alone. The Trainer writes a checkpoint in place, not to a staging folder
    renamed at the end: the main process writes the model files, the optimizer, the scheduler and its RNG
    state, and `trainer_state.json` last. A kill in between leaves a `checkpoint-N` folder holding part of
    that, and a full disk or a failing device can leave a file cut short even behind a valid trainer state.
    Each candidate, newest first, is checked by `checkpoint_problem`; one that fails is passed over with a
    warning naming the file, so the resume goes one checkpoint back. A save never touches earlier checkpoints
    (the `save_total_limit` rotation deletes old folders only after the new trainer state is written), and the
    resumed run rewrites the broken folder when it gets there.

    The other ranks' `rng_state_<rank>.pth`, written with no barrier to the main process, are checked when
    present; a missing one is not an error (the world size the checkpoint was written with may differ from
    the resuming run's, and the Trainer then resumes without that rank's RNG state, which only dropout notices).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and (before_step is None or int(match.group(1)) < before_step):
            candidates.append((int(match.group(1)), entry))
    for _, checkpoint in sorted(candidates, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        warn(f"not resuming from {checkpoint.name}: {problem}")
        logger.warning("not resuming from %s: %s", checkpoint, problem)
    return None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint `--resume_from_checkpoint` means: "auto" -> the newest intact one in `output_dir` (or None,
    a fresh start); a path -> that checkpoint, refused with a ConfigError naming the broken file."""
    if resume in (None, ""):
        return None
    if resume == "auto":
        return latest_complete_checkpoint(output_dir)
    problem = checkpoint_problem(resume)
    if problem:
        raise ConfigError(f"resume_from_checkpoint: {problem}")
    return str(resume)


# ---------------------------------------------------------------------------------------------------------------
# A save that runs out of disk space
# ---------------------------------------------------------------------------------------------------------------

# How a full disk surfaces: OSError from Python's own writes, torch.save's C++ writer and safetensors' Rust one.
_DISK_FULL_TEXT = ("no space left", "unexpected pos", "file write failed", "storagefull", "disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return any(marker in text for marker in _DISK_FULL_TEXT)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class CheckpointSaveError(ConfigError):
    """A checkpoint could not be written (the disk is full); the message is the one line to print."""


def save_failure(err: BaseException, output_dir: str | os.PathLike, checkpoint: str | os.PathLike,
                 estimated_bytes: int) -> CheckpointSaveError | None:
    """The one-line error for a save of `checkpoint` that failed with `err` because the disk is full, after
    removing the part-written folder; None when `err` is something else (let it propagate as it is).

    The space needed is the size of the newest intact checkpoint beside it (a checkpoint of the same run has
    the same size), else `estimated_bytes`.
    """
    if not is_disk_full(err):
        return None
    output_dir, checkpoint = Path(output_dir), Path(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)  # part-written: never resumable, and it holds the space
    previous = latest_complete_checkpoint(output_dir)
    needed = folder_bytes(Path(previous)) if previous else estimated_bytes
    free = shutil.disk_usage(output_dir).free
    kept = f"; {Path(previous).name} is kept" if previous else ""
    return CheckpointSaveError(
        f"output_dir: no space left on the device of {output_dir} while saving {checkpoint.name}: a checkpoint "
        f"needs about {format_bytes(needed)}, {format_bytes(free)} is free{kept}")


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold `<output_dir>/run.lock` for the duration; a second run on the same folder gets a ConfigError naming
    the host and pid of the one that holds it.

    An advisory `flock` on the open file: the kernel drops it when the holder exits, however it exits (a
    SIGKILL included), so a lock is never stale. The file keeps the holder's host, pid and start time for the
    message. Only one process per run takes it (`enabled`: the main process). flock is local to one machine
    (and not reliable on every network file system).
    """
    if not enabled:
        yield
        return
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                owner = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                owner = {}
            raise ConfigError(
                f"output_dir: {folder} is in use by another run (host {owner.get('host', '?')}, pid "
                f"{owner.get('pid', '?')}, started {owner.get('started', '?')}); stop that run first or choose "
                "another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


# ---------------------------------------------------------------------------------------------------------------
# How launched ranks end: with their launcher, and out of their process group
# ---------------------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def leave_process_group() -> None:
    """Destroy the process groups this process joined, if any (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ReadableSavesMixin:
    """For a `transformers.Trainer` subclass: saved model folders (checkpoints and the final one) get the modes the
    umask gives, as every other file the Trainer writes has; `safetensors` writes its files 0600."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            honour_umask(output_dir or self.args.output_dir)


def exit_rank(code: int | None) -> NoReturn:
    """End the process with `code`; a launched rank ends without interpreter finalization.

    A rank that trained under DDP on gloo aborts now and then (SIGABRT, "terminate called without an active
    exception") while the interpreter finalizes, after its work is done; the rank that finishes first, under
    load (seen in the test suite, not reproduced on demand). Once a DDP model has been built, something in
    torch's C++ keeps the gloo backend alive: `destroy_process_group` cannot stop gloo's threads (still running
    after it, the model's deletion and a full garbage collection), and their objects are torn down in whatever
    order finalization reaches them. So a launched rank does everything a normal exit does that can matter to
    its outputs (waits for its non-daemon threads, runs every exit handler: Ember's, logging's, the
    libraries'; flushes stdout and stderr) and then leaves with `os._exit`, skipping only the teardown. Outside
    a launch (a plain `python recipes/...`, or `main()` called in-process) this is `sys.exit(code)`.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code and not is_main_process():
        # Only the main rank prints a failure's `error:` line, and torch-elastic SIGTERMs the other ranks as soon
        # as one exits: a rank that fails ahead of the main one waits for it (its SIGTERM ends the wait), so the
        # line is printed under load too.
        time.sleep(FAILED_RANK_GRACE_S)
    os._exit(code or 0)


def as_launched_rank(sig: int = signal.SIGTERM) -> bool:
    """Set up how this process ends: it leaves its process group at exit (`leave_process_group`, registered
    once however often this is called), and, in a rank started by torch-elastic (`accelerate launch`,
    `torchrun`), Linux sends it `sig` when its launcher dies. Returns whether the latter was set up.

    torch-elastic starts every rank in a session of its own, so killing the launcher's process group
    (`kill -9 -PGID`, or a terminal closing) leaves the ranks training on, and they keep writing checkpoints
    into an `output_dir` that a resumed run may be writing too. torch has no option for this; the
    parent-death signal (prctl PR_SET_PDEATHSIG, Linux only) is it. If the launcher is already gone (this
    process was re-parented before the call), exit at once.
    """
    atexit.unregister(leave_process_group)
    atexit.register(leave_process_group)
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if launcher == 1 or os.getppid() != launcher:
        os.kill(os.getpid(), sig)
    return True
