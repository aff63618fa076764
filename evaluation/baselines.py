"""General-purpose compressors as a yardstick for a language model's bits per byte.

    from evaluation.baselines import compressor_bits_per_byte
    compressor_bits_per_byte(read_documents("outputs/quickstart/data/documents/validation"), max_documents=12)

A language model's held-out bits per byte is its code length for the text under arithmetic coding, so it
compares directly with a compressor's output size: each document is compressed on its own (as the model scores
each document on its own) at the command-line tools' strongest settings, and bits per byte is
8 x compressed bytes / UTF-8 bytes, container headers included (a few bytes per document):

- gzip -9 (DEFLATE, `gzip` module), zstd -19 (`zstandard`), xz -9e (LZMA2, `lzma`), bzip2 -9 (`bz2`).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import zstandard

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "zstd -19": lambda data: zstandard.ZstdCompressor(level=19).compress(data),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "bzip2 -9": lambda data: bz2.compress(data, compresslevel=9),
}


def compressor_bits_per_byte(texts: Iterable[str], max_documents: int | None = None) -> dict[str, dict[str, Any]]:
    """{compressor: {"bits_per_byte", "compressed_bytes", "bytes", "documents"}} over the first `max_documents`
    texts (all when None), each compressed on its own. Empty documents count as documents and add nothing."""
    documents = [text.encode("utf-8") for text in islice(texts, max_documents)]
    total = sum(len(data) for data in documents)
    results = {}
    for name, compress in COMPRESSORS.items():
        compressed = sum(len(compress(data)) for data in documents if data)
        results[name] = {"bits_per_byte": 8 * compressed / total if total else None, "compressed_bytes": compressed,
                         "bytes": total, "documents": len(documents)}
    return results
