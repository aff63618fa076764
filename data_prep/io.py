"""Files the pipeline writes: atomic replacement and zstd-compressed JSON-lines document shards.

Every output is written to a temporary name in the destination directory and renamed into place
only when complete, so an interrupted run leaves either the finished file or nothing. A step
treats "its output file exists" as "this shard is done" and never redoes it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from cli import file_mode

DOC_SHARD_SUFFIX = ".jsonl.zst"


def shard_name(index: int, num_shards: int, suffix: str = DOC_SHARD_SUFFIX) -> str:
    return f"{index:05d}-of-{num_shards:05d}{suffix}"


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary sibling of `path`; on clean exit fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would stay with the renamed file
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_docs(path: str | Path, docs: Iterable[dict[str, Any]]) -> int:
    """Write documents as zstd JSON lines, atomically. Returns the number written."""
    count = 0
    with atomic_open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zst:
        text = io.TextIOWrapper(zst, encoding="utf-8", write_through=True)
        for doc in docs:
            text.write(json.dumps(doc, ensure_ascii=False))
            text.write("\n")
            count += 1
        text.flush()
        text.detach()
    return count


def read_docs(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a shard written by `write_docs`."""
    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            yield json.loads(line)
