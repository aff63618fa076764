"""Tokenize documents and pack them into pre-tokenized shards of fixed-length training blocks.

Every document's tokens are followed by one EOS id and the documents of a shard are concatenated
into a single token stream; nothing is padded and nothing is dropped mid-stream. A training example
is a block of `seq_len + 1` consecutive tokens, block i = stream[i * seq_len : i * seq_len + seq_len + 1]:
consecutive blocks share one token, so every token after the first is a prediction target exactly
once. Only the tail after the last full block is left out, and the metadata says how long it is:

    num_tokens == num_blocks * seq_len + (1 if num_blocks else 0) + remainder_tokens

A shard is three files next to each other:

    <prefix>.bin       the stream as raw little-endian uint16 (vocab_size <= 65536) or uint32
    <prefix>.idx.npy   uint64 end offset of every document (the position just after its EOS)
    <prefix>.json      metadata; written last, so it doubles as the "this shard is complete" marker

The writer streams to temporary files and renames them into place in `close()`, so memory stays
bounded whatever the corpus size and an interrupted run leaves no `.json`: a `.bin` without its
`.json` is incomplete, readers ignore it and the next run overwrites it.

Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle", arXiv:2207.14255). With probability `fim_rate` a document of kind "code" is cut at two
uniformly random character positions into prefix / middle / suffix, each piece is tokenized on its
own, and the document is emitted in one of the paper's two formats:

    PSM (Sec. 3):        <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>
    SPM (Sec. 3.1, with probability fim_spm_rate):
                         <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <eos>

SPM variants differ across papers and codebases; this is the variant that keeps <fim_prefix> first, so the sentinel
order is the same in both formats and the prefix runs straight into the middle. The random draws
for a document come from a generator seeded with (seed, document position), so the output does not
depend on batching, on where a run was resumed, or on which other documents were FIM-transformed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cli import file_mode
from data_prep.config import ConfigError, PackConfig
from data_prep.io import atomic_write_text
from data_prep.report import StepReport
from data_prep.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, encode_documents, tokenizer_fingerprint

FORMAT_NAME = "ember-packed-tokens"
FORMAT_VERSION = 1
# Keys the writer owns; `extra_metadata` may not override them.
CORE_METADATA_KEYS = ("format", "format_version", "dtype", "seq_len", "vocab_size", "eos_id",
                      "tokenizer_fingerprint", "num_tokens", "num_documents", "num_blocks", "remainder_tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def count_blocks(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(number of full `seq_len + 1` blocks at stride `seq_len`, tokens left in no full block)."""
    num_blocks = max(0, (num_tokens - 1) // seq_len)
    covered = num_blocks * seq_len + 1 if num_blocks else 0
    return num_blocks, num_tokens - covered


def concat_with_eos(token_lists: Sequence[Sequence[int] | np.ndarray], eos_id: int,
                    dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by `eos_id`, into one array without a per-token Python loop.

    Returns the stream and the cumulative end offset of each document (just after its EOS).
    Ids outside `dtype` raise a one-line ValueError.
    """
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    if token_lists and all(isinstance(t, np.ndarray) for t in token_lists):
        flat = np.concatenate([t.ravel() for t in token_lists]).astype(np.int64, copy=False)
    else:
        flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=total)
    limit = np.iinfo(dtype).max
    if flat.size and (flat.min() < 0 or flat.max() > limit):
        bad = int(flat[(flat < 0) | (flat > limit)][0])
        raise ValueError(f"token id {bad} does not fit {np.dtype(dtype).name}")
    ends = np.cumsum(lengths + 1)
    stream = np.empty(total + len(token_lists), dtype=dtype)
    is_eos = np.zeros(stream.size, dtype=bool)
    is_eos[ends - 1] = True
    stream[is_eos] = eos_id
    stream[~is_eos] = flat
    return stream, ends


@dataclass(frozen=True)
class FimSpec:
    """Resolved FIM settings: rates, seed and the tokenizer's sentinel ids."""

    rate: float
    spm_rate: float
    seed: int
    prefix_id: int
    middle_id: int
    suffix_id: int

    @classmethod
    def from_config(cls, cfg: PackConfig, tokenizer) -> FimSpec | None:
        """None when FIM is off; a one-line ConfigError when it is on and the tokenizer lacks the sentinels."""
        if cfg.fim_rate <= 0:
            return None
        vocab = tokenizer.get_vocab()
        missing = [t for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX) if t not in vocab]
        if missing:
            raise ConfigError(f"pack.fim_rate: is {cfg.fim_rate} but the tokenizer has no {', '.join(missing)} "
                             "token (train it with tokenizer.fim_tokens: true, or set pack.fim_rate: 0)")
        return cls(cfg.fim_rate, cfg.fim_spm_rate, cfg.seed, vocab[FIM_PREFIX], vocab[FIM_MIDDLE], vocab[FIM_SUFFIX])

    def metadata(self) -> dict[str, Any]:
        return {"rate": self.rate, "spm_rate": self.spm_rate, "seed": self.seed,
                "formats": "psm: PRE p SUF s MID m | spm: PRE SUF s MID p m (Bavarian et al. 2022)"}

    def draw(self, text: str, position: int) -> tuple[int, int, bool] | None:
        """The split points and SPM choice for one code document, or None to leave it as it is."""
        rng = np.random.default_rng((self.seed, position))
        if rng.random() >= self.rate:
            return None
        use_spm = bool(rng.random() < self.spm_rate)
        start, end = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
        return start, end, use_spm


def tokenize_documents(docs: Sequence[dict], tokenizer, fim: FimSpec | None = None,
                       positions: Sequence[int] | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each document (without EOS), FIM applied to code documents; also the FIM count.

    `positions` are the documents' positions in their source (they seed the FIM draws); by default
    0, 1, 2, ... All texts and FIM pieces of the batch go to the tokenizer in one call.
    """
    positions = range(len(docs)) if positions is None else positions
    texts: list[str] = []
    # Per document: (index of its first text in `texts`, FIM draw or None).
    plan: list[tuple[int, tuple[int, int, bool] | None]] = []
    for doc, position in zip(docs, positions):
        text = doc.get("text") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            where = doc.get("id", f"document {position}") if isinstance(doc, dict) else f"document {position}"
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        draw = fim.draw(text, position) if fim is not None and doc.get("kind", "text") == "code" else None
        plan.append((len(texts), draw))
        if draw is None:
            texts.append(text)
        else:
            start, end, _ = draw
            texts.extend((text[:start], text[start:end], text[end:]))
    encoded = encode_documents(tokenizer, texts)
    token_lists: list[list[int]] = []
    for first, draw in plan:
        if draw is None:
            token_lists.append(encoded[first])
            continue
        prefix, middle, suffix = encoded[first:first + 3]
        if draw[2]:  # SPM
            ids = [fim.prefix_id, fim.suffix_id, *suffix, fim.middle_id, *prefix, *middle]
        else:
            ids = [fim.prefix_id, *prefix, fim.suffix_id, *suffix, fim.middle_id, *middle]
        token_lists.append(ids)
    num_fim = sum(draw is not None for _, draw in plan)
    return token_lists, num_fim


class PackedShardWriter:
    """Streams documents into one packed shard (`<prefix>.bin/.idx.npy/.json`), atomically.

    Use as a context manager: a clean exit closes the shard, an exception removes the temporary files
    and leaves any earlier complete shard at `prefix` untouched.
    """

    def __init__(self, prefix: Path, seq_len: int, vocab_size: int, eos_id: int, tokenizer_fingerprint: str,
                 extra_metadata: dict | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id: {eos_id} is outside the vocabulary of {vocab_size} tokens")
        clashes = sorted(set(extra_metadata or {}) & set(CORE_METADATA_KEYS))
        if clashes:
            raise ValueError(f"extra_metadata: key {clashes[0]!r} is reserved for the shard format")
        self.prefix = Path(prefix)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.extra_metadata = dict(extra_metadata or {})
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        self.num_documents = 0
        self.metadata: dict[str, Any] | None = None
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_paths: list[Path] = []
        self._bin = self._temp_file(".bin")
        self._ends = self._temp_file(".idx")

    def _temp_file(self, suffix: str):
        fd, path = tempfile.mkstemp(prefix=f".{self.prefix.name}{suffix}.", suffix=".tmp", dir=self.prefix.parent)
        self._tmp_paths.append(Path(path))
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would stay with the renamed file
        return os.fdopen(fd, "wb", buffering=1 << 20)

    def __enter__(self) -> PackedShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.metadata is None:
            self.close()

    def add_documents(self, token_lists: Sequence[Sequence[int] | np.ndarray]) -> None:
        """Append many documents at once (the fast path: one numpy concatenation, one write)."""
        if self.metadata is not None:
            raise ValueError(f"{self.prefix}: shard is already closed")
        if not token_lists:
            return
        stream, ends = concat_with_eos(token_lists, self.eos_id, self.dtype)
        if int(stream.max()) >= self.vocab_size:
            bad = int(stream[stream >= self.vocab_size][0])
            raise ValueError(f"{self.prefix}: token id {bad} is outside the vocabulary of {self.vocab_size} tokens")
        self._bin.write(memoryview(stream))
        self._ends.write(memoryview((ends + self.num_tokens).astype("<u8")))
        self.num_tokens += int(stream.size)
        self.num_documents += len(token_lists)

    def close(self) -> dict:
        """Move the finished files into place (metadata last) and return the metadata."""
        if self.metadata is not None:
            return self.metadata
        try:
            num_blocks, remainder = count_blocks(self.num_tokens, self.seq_len)
            metadata = {
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
                "seq_len": self.seq_len, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "num_blocks": num_blocks, "remainder_tokens": remainder,
                **self.extra_metadata,
            }
            for handle in (self._bin, self._ends):
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            bin_tmp, ends_tmp = self._tmp_paths
            idx_tmp = self._npy_from_raw(ends_tmp)
            # Drop the old completion marker first: from here until the new one lands the shard reads
            # as incomplete rather than as old metadata describing new data.
            json_path = self.prefix.with_name(self.prefix.name + ".json")
            json_path.unlink(missing_ok=True)
            os.replace(bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
            os.replace(idx_tmp, self.prefix.with_name(self.prefix.name + ".idx.npy"))
            atomic_write_text(json_path, json.dumps(metadata, indent=2, sort_keys=True))
        except BaseException:
            self.abort()
            raise
        self._remove_temp_files()
        self.metadata = metadata
        return metadata

    def _npy_from_raw(self, raw_path: Path) -> Path:
        """Wrap the raw uint64 offsets in a .npy header, copying in chunks (no full load into memory)."""
        fd, path = tempfile.mkstemp(prefix=f".{self.prefix.name}.idx.npy.", suffix=".tmp", dir=self.prefix.parent)
        self._tmp_paths.append(Path(path))
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as out, open(raw_path, "rb") as raw:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<u8")), "fortran_order": False,
                      "shape": (self.num_documents,)}
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := raw.read(1 << 24):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return Path(path)

    def abort(self) -> None:
        """Discard everything written so far; leaves no final file behind."""
        for handle in (self._bin, self._ends):
            with contextlib.suppress(OSError):
                handle.close()
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        for path in self._tmp_paths:
            path.unlink(missing_ok=True)
        self._tmp_paths = []


def batched_documents(docs: Iterable[dict], max_docs: int, max_chars: int) -> Iterator[list[dict]]:
    """Batches of at most `max_docs` documents that stop growing once they hold `max_chars` characters."""
    batch: list[dict] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc["text"]) if isinstance(doc.get("text"), str) else 0
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def pack_documents(docs: Iterable[dict], tokenizer, prefix: Path, cfg: PackConfig, report: StepReport | None = None,
                   batch_docs: int | None = None) -> dict:
    """Tokenize `docs` ({"text", "kind", ...}) in batches, apply FIM to code, write one packed shard.

    Document positions (0, 1, ... in `docs` order) seed the FIM draws; give shards different
    `cfg.seed`s if their FIM cut points should not be correlated. Returns the shard metadata.
    """
    batch_docs = batch_docs or cfg.batch_docs
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token; packing needs one to separate documents")
    fim = FimSpec.from_config(cfg, tokenizer)
    extra = {"fim": fim.metadata() if fim else None}
    sources: Counter = Counter()
    kinds: Counter = Counter()
    num_fim = 0
    writer = PackedShardWriter(prefix, cfg.seq_len, len(tokenizer), tokenizer.eos_token_id,
                               tokenizer_fingerprint(tokenizer), extra)
    with writer, tqdm(desc=f"pack {Path(prefix).name}", unit="doc", disable=None) as progress:
        for batch in batched_documents(docs, batch_docs, cfg.batch_chars):
            first = writer.num_documents
            token_lists, batch_fim = tokenize_documents(batch, tokenizer, fim, range(first, first + len(batch)))
            writer.add_documents(token_lists)
            num_fim += batch_fim
            sources.update(str(doc.get("source", "")) for doc in batch)
            kinds.update(str(doc.get("kind", "text")) for doc in batch)
            progress.update(len(batch))
        writer.extra_metadata.update(fim_documents=num_fim, source_documents=dict(sorted(sources.items())),
                                     kind_documents=dict(sorted(kinds.items())))
        metadata = writer.close()
    if report is not None:
        report.extra.update(tokens=metadata["num_tokens"], blocks=metadata["num_blocks"],
                            remainder_tokens=metadata["remainder_tokens"], fim_docs=num_fim)
    return metadata
