"""General-purpose compressors as a yardstick for a language model's bits per byte.

    from evaluation.baselines import compressor_bits_per_byte
    compressor_bits_per_byte(read_documents("outputs/quickstart/data/documents/validation"), max_documents=12)

A language model's held-out bits per byte is its code length for the text under arithmetic coding, so it
compares directly with a compressor's output size: each document is compressed on its own (as the model scores
each document on its own) at the command-line tools' strongest settings, and bits per byte is
8 x compressed bytes / UTF-8 bytes, container headers included (a few bytes per document; about 1 KB for zpaq):

- gzip -9 (DEFLATE, `gzip` module), zstd -19 (`zstandard`), xz -9e (LZMA2, `lzma`), bzip2 -9 (`bz2`),
  brotli -q 11 with a 16 MiB window (`brotli`, lgwin 24);
- zpaq -m5 (context mixing; Debian's `zpaq` program): measured only where `zpaq` is on PATH, else its entry is
  marked not measured (`bits_per_byte` None, `not_measured` saying why).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import brotli
import zstandard


def zpaq_m5(data: bytes) -> bytes:
    """`data` as a one-file zpaq -m5 archive: zpaq 7 has no raw stream at -m5, so the whole archive is counted.
    That is the compressed block (its header carries -m5's model description and the block's SHA-1: about 350
    bytes for a 1-byte document) plus the journaling format's transaction header (104 bytes), fragment hashes
    (125+) and file index (432+: the name "d" and a date; -noattributes drops the permissions), about 1 KB per
    document before any text. No option of zpaq 7.15 drops the journal for -m5: its streaming format (-ms...)
    takes only a hand-written model, not -m5's."""
    with tempfile.TemporaryDirectory(prefix="ember_zpaq_") as folder:
        Path(folder, "d").write_bytes(data)
        subprocess.run(["zpaq", "a", "a.zpaq", "d", "-m5", "-noattributes"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return Path(folder, "a.zpaq").read_bytes()


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "zstd -19": lambda data: zstandard.ZstdCompressor(level=19).compress(data),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "bzip2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "brotli -q 11": lambda data: brotli.compress(data, quality=11, lgwin=24),
    "zpaq -m5": zpaq_m5,
}
# Compressors that run a program, measured only where it is on PATH.
PROGRAMS = {"zpaq -m5": "zpaq"}


def compressor_bits_per_byte(texts: Iterable[str], max_documents: int | None = None) -> dict[str, dict[str, Any]]:
    """{compressor: {"bits_per_byte", "compressed_bytes", "bytes", "documents"}} over the first `max_documents`
    texts (all when None), each compressed on its own. Empty documents count as documents and add nothing. A
    compressor whose program is not installed has None for bits_per_byte and compressed_bytes, and a
    "not_measured" reason ("zpaq not installed")."""
    documents = [text.encode("utf-8") for text in islice(texts, max_documents)]
    total = sum(len(data) for data in documents)
    results = {}
    for name, compress in COMPRESSORS.items():
        program = PROGRAMS.get(name)
        if program and shutil.which(program) is None:
            results[name] = {"bits_per_byte": None, "compressed_bytes": None, "bytes": total,
                             "documents": len(documents), "not_measured": f"{program} not installed"}
            continue
        compressed = sum(len(compress(data)) for data in documents if data)
        results[name] = {"bits_per_byte": 8 * compressed / total if total else None, "compressed_bytes": compressed,
                         "bytes": total, "documents": len(documents)}
    return results
