"""File modes: what Ember writes honours the process's umask, like any other tool's output.

Atomic writes go through `tempfile.mkstemp` / `mkdtemp`, which create 0600 files and 0700 folders, and the
`safetensors` library writes its files 0600 too; renamed into place, those modes would stay, and a teammate
on a shared cluster (or a serving container running as another user) could not read a data run or a model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain `open` / `mkdir` would have: a folder and the files directly in it, or a file."""
    path, mask = Path(path), umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for entry in path.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, 0o666 & ~mask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~mask)
