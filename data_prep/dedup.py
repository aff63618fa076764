"""Exact and near-duplicate removal across shards, in three stages.

1. Per shard (in parallel): `DedupSignatures` turns every document into a few numbers and saves them as one
   .npz file: a 128-bit hash of the normalised text (exact dedup) and one 64-bit key per MinHash LSH band
   (near dedup). No text is kept.
2. Once, globally: `plan_removals` reads every shard's signature file, links documents that share an exact
   hash or any band key, clusters the links (union-find on numpy arrays), keeps the first document of each
   cluster in (shard, index) order and writes one removal file per shard. It holds only numeric arrays, a
   few hundred bytes per document, never text.
3. Per shard: the pipeline re-reads the shard's stream and drops the indices in `load_removals`.

Normalisation. Exact dedup hashes the text lowercased with whitespace runs collapsed to one space, so copies
that differ only in case, spacing or indentation count as exact duplicates (MinHash would merge them anyway).
Near dedup shingles word n-grams of the words datatrove's `simplify_text` yields (lowercase, punctuation to
spaces, diacritics folded). Digits are mapped to "0" only with `normalize_numbers`: otherwise tables, logs and
code that differ only in their constants would all merge. A document with fewer than `n_grams` words is one
shingle of all its words; one with no words at all takes part in exact dedup only.

LSH. A signature is `num_buckets * hashes_per_bucket` minimums of `(a * shingle + b) mod 2**64` (top 32 bits,
random odd `a`, from `seed`), computed as one numpy array per document. Two documents become candidates when
all `hashes_per_bucket` values of any one band agree; for Jaccard similarity s that happens with probability
1 - (1 - s**r)**b: with the default 14 bands of 8, 0.92 at s=0.8, 0.56 at s=0.7, 0.05 at s=0.5.

Library choice: datatrove's MinHash stages are executor pipeline steps over its own Document objects and
folders (one non-atomic file per band per rank) that hash every shingle in Python, and datasketch keeps one
object per document in memory; so this module reuses datatrove's normalisation rules and xxhash and does the
hashing, banding and clustering with numpy, vectorised per document.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import zipfile
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import regex
from datatrove.utils.text import NUMBERS_PATTERN, PUNCTUATION
from xxhash import xxh3_64_intdigest, xxh3_128_digest

from data_prep.config import ConfigError, DedupConfig, MinHashConfig
from data_prep.io import atomic_open

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REASONS = (EXACT_DUPLICATE, NEAR_DUPLICATE)  # removal files store the position in this tuple
SIGNATURE_FORMAT = 1

# Odd 64-bit constant (2**64 / golden ratio) that folds consecutive word hashes into one n-gram hash.
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
# Shingles per block of the (hashes x shingles) matrix, bounding memory on very long documents.
_SHINGLE_BLOCK = 4096

# The normalisation of datatrove's `simplify_text` (its punctuation set and number pattern), done faster: its
# `str.translate` and per-character diacritics loop dominated the signature time. ASCII text, the common case,
# is lowercased and stripped of punctuation by one `bytes.translate`.
_ASCII_LOWER_NO_PUNCTUATION = bytes(
    ord(" ") if chr(c) in PUNCTUATION else ord(chr(c).lower()) for c in range(128)
).ljust(256, b" ")
_PUNCTUATION_RUNS = re.compile("[" + re.escape("".join(sorted(set(PUNCTUATION)))) + "]+")
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")


# ---------------------------------------------------------------------------------------------
# Text -> hashes. Shared with decontamination so both see the same words.
# ---------------------------------------------------------------------------------------------

def normalized_words(text: str, normalize_numbers: bool = False) -> list[bytes]:
    """The words MinHash and decontamination compare: lowercase, no punctuation, diacritics folded.

    Same words as `simplify_text(text, TextNormConfig(norm_numbers=normalize_numbers)).split()`.
    """
    if normalize_numbers:
        text = NUMBERS_PATTERN.sub("0", text)
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_LOWER_NO_PUNCTUATION).split()
    text = _PUNCTUATION_RUNS.sub(" ", text.lower())
    text = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return " ".join(text.split()).encode("utf-8", "surrogatepass").split()


def word_hashes(words: Sequence[bytes]) -> np.ndarray:
    return np.fromiter(map(xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per window of n consecutive word hashes; fewer than n words make one window of all."""
    if len(hashes) == 0:
        return hashes
    n = min(n, len(hashes))
    count = len(hashes) - n + 1
    combined = hashes[:count].copy()
    for offset in range(1, n):
        combined *= _NGRAM_MULTIPLIER
        combined += hashes[offset:offset + count]
    return combined


def exact_key(text: str) -> bytes:
    """128-bit hash of the text lowercased, with every whitespace run collapsed to one space."""
    return xxh3_128_digest(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"))


class MinHasher:
    """MinHash signatures and LSH band keys for one `MinHashConfig`; the same seed gives the same numbers."""

    def __init__(self, cfg: MinHashConfig):
        self.cfg = cfg
        num_hashes = cfg.num_buckets * cfg.hashes_per_bucket
        rng = np.random.default_rng(cfg.seed)
        self.multipliers = rng.integers(1, 2**64, size=num_hashes, dtype=np.uint64) | np.uint64(1)
        self.offsets = rng.integers(0, 2**64, size=num_hashes, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        words = normalized_words(text, self.cfg.normalize_numbers)
        return ngram_hashes(word_hashes(words), self.cfg.n_grams)

    def signature(self, text: str) -> np.ndarray | None:
        """`num_buckets * hashes_per_bucket` uint32 minimums, or None for a text without words."""
        shingles = self.shingles(text)
        if len(shingles) == 0:
            return None
        minimums = np.full(len(self.multipliers), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _SHINGLE_BLOCK):
            block = np.multiply.outer(self.multipliers, shingles[start:start + _SHINGLE_BLOCK])
            block += self.offsets[:, None]
            np.minimum(minimums, block.min(axis=1), out=minimums)
        # The minimum's top half is the minimum of the top halves, the well-mixed bits of a * x + b.
        return (minimums >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, text: str) -> np.ndarray | None:
        """One uint64 per band: a hash of the band's `hashes_per_bucket` signature values."""
        signature = self.signature(text)
        if signature is None:
            return None
        bands = signature.reshape(self.cfg.num_buckets, self.cfg.hashes_per_bucket)
        return np.fromiter((xxh3_64_intdigest(band.tobytes()) for band in bands), dtype=np.uint64,
                           count=self.cfg.num_buckets)


# ---------------------------------------------------------------------------------------------
# Stage 1: per-shard signature files.
# ---------------------------------------------------------------------------------------------

def _settings(cfg: DedupConfig) -> dict:
    """What a signature file depends on; stage 2 refuses files computed with other settings."""
    m = cfg.minhash
    return {"format": SIGNATURE_FORMAT, "exact": cfg.exact, "minhash": m.enabled, "n_grams": m.n_grams,
            "num_buckets": m.num_buckets, "hashes_per_bucket": m.hashes_per_bucket, "seed": m.seed,
            "normalize_numbers": m.normalize_numbers}


class DedupSignatures:
    """Collects the signatures of one shard's documents, in stream order, and saves them as one .npz file."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.minhasher = MinHasher(cfg.minhash) if cfg.minhash.enabled else None
        self.exact_width = 2 if cfg.exact else 0  # a 128-bit hash as two uint64
        self.band_width = cfg.minhash.num_buckets if cfg.minhash.enabled else 0
        self._indices = array("q")
        self._exact = array("Q")
        self._bands = array("Q")
        self._has_words = bytearray()

    def __len__(self) -> int:
        return len(self._indices)

    def add(self, index: int, text: str) -> None:
        """Record document `index` of the shard's stream; indices must increase."""
        if self._indices and index <= self._indices[-1]:
            raise ValueError(f"dedup: document index {index} follows {self._indices[-1]}; indices must increase")
        self._indices.append(index)
        if self.cfg.exact:
            self._exact.frombytes(exact_key(text))
        if self.minhasher is not None:
            keys = self.minhasher.band_keys(text)
            self._has_words.append(keys is not None)
            self._bands.frombytes(keys.tobytes() if keys is not None else bytes(8 * self.band_width))
        else:
            self._has_words.append(False)

    def save(self, path: Path) -> None:
        count = len(self)
        arrays = {
            "index": np.frombuffer(self._indices, dtype=np.int64),
            "exact": np.frombuffer(self._exact, dtype=np.uint64).reshape(count, self.exact_width),
            "bands": np.frombuffer(self._bands, dtype=np.uint64).reshape(count, self.band_width),
            "has_words": np.frombuffer(self._has_words, dtype=np.bool_),
            "settings": np.array(json.dumps(_settings(self.cfg), sort_keys=True)),
        }
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)


def signature_throughput(texts: Sequence[str], cfg: DedupConfig) -> float:
    """Stage 1 speed on `texts`, in documents per second."""
    signatures = DedupSignatures(cfg)
    start = time.perf_counter()
    for index, text in enumerate(texts):
        signatures.add(index, text)
    return len(texts) / max(time.perf_counter() - start, 1e-9)


def _load_signatures(path: Path, cfg: DedupConfig) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("index", "exact", "bands", "has_words", "settings")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable dedup signature file ({type(err).__name__}: {err})") from None
    found, expected = json.loads(str(arrays.pop("settings"))), _settings(cfg)
    if found != expected:
        changed = ", ".join(f"{k}={found.get(k)!r} (config: {v!r})" for k, v in expected.items() if found.get(k) != v)
        raise ConfigError(f"dedup: {path} was computed with {changed}; delete the signature files to recompute")
    return arrays


# ---------------------------------------------------------------------------------------------
# Stage 2: link, cluster, plan removals. Documents are rows 0..N-1 in (shard, index) order.
# ---------------------------------------------------------------------------------------------

def _first_with_same_key(keys: np.ndarray) -> np.ndarray:
    """For each row of `keys` (rows x columns), the first row holding the same key."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(keys.T)  # stable: equal keys keep row order, so a run starts at its first row
    ordered = keys[order]
    run_starts = np.ones(len(keys), dtype=bool)
    run_starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = order[run_starts][np.cumsum(run_starts) - 1]
    return first


def _merge_clusters(root: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Union-find over arrays: join the clusters of left[i] and right[i]; a cluster's root is its smallest row.

    `root` stays fully compressed (root[x] is x's root), so roots are hooked directly, larger onto smaller;
    a root hooked by several pairs at once takes the smallest, and the other pairs wait for the next pass.
    """
    while len(left):
        root_left, root_right = root[left], root[right]
        apart = root_left != root_right
        left, right, root_left, root_right = left[apart], right[apart], root_left[apart], root_right[apart]
        np.minimum.at(root, np.maximum(root_left, root_right), np.minimum(root_left, root_right))
        while True:  # pointer jumping until every row points at a root again
            grand = root[root]
            if np.array_equal(grand, root):
                break
            root[:] = grand


def plan_removals(signature_paths: list[Path], cfg: DedupConfig, removal_paths: list[Path]) -> Counter:
    """Cluster duplicates over all shards and write one removal file per shard.

    Returns {"exact_duplicate": removed exact copies, "near_duplicate": other removed documents,
    "clusters": kept documents that had duplicates}.
    """
    if len(signature_paths) != len(removal_paths):
        raise ValueError(f"dedup: {len(signature_paths)} signature files but {len(removal_paths)} removal paths")
    shards = [_load_signatures(Path(p), cfg) for p in signature_paths]
    offsets = np.cumsum([0] + [len(s["index"]) for s in shards])
    index = np.concatenate([s["index"] for s in shards])
    exact = np.concatenate([s["exact"] for s in shards])
    bands = np.concatenate([s["bands"] for s in shards])
    has_words = np.concatenate([s["has_words"] for s in shards])
    del shards

    rows = np.arange(len(index))
    root = rows.copy()
    exact_copy_of = rows
    if cfg.exact:
        exact_copy_of = _first_with_same_key(exact)
        _merge_clusters(root, exact_copy_of, rows)
    if cfg.minhash.enabled:
        with_words = np.flatnonzero(has_words)
        for band in range(bands.shape[1]):
            first = with_words[_first_with_same_key(bands[with_words, band:band + 1])]
            linked = first != with_words
            _merge_clusters(root, first[linked], with_words[linked])

    removed = root != rows
    is_exact = exact_copy_of != rows  # an identical text comes earlier; always also `removed`
    for shard, path in enumerate(removal_paths):
        shard_rows = offsets[shard] + np.flatnonzero(removed[offsets[shard]:offsets[shard + 1]])
        kept = root[shard_rows]
        _write_removals(Path(path), index=index[shard_rows], reason=np.where(is_exact[shard_rows], 0, 1),
                        kept_shard=np.searchsorted(offsets, kept, side="right") - 1, kept_index=index[kept])
    return Counter({EXACT_DUPLICATE: int(is_exact.sum()), NEAR_DUPLICATE: int(removed.sum() - is_exact.sum()),
                    "clusters": len(np.unique(root[removed]))})


# ---------------------------------------------------------------------------------------------
# Stage 3 inputs: removal files.
# ---------------------------------------------------------------------------------------------

def _write_removals(path: Path, index: np.ndarray, reason: np.ndarray, kept_shard: np.ndarray,
                    kept_index: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(handle, index=index.astype(np.int64), reason=reason.astype(np.uint8),
                 kept_shard=kept_shard.astype(np.int32), kept_index=kept_index.astype(np.int64))


def _read_removals(path: Path) -> dict[str, list[int]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key].tolist() for key in ("index", "reason", "kept_shard", "kept_index")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable dedup removal file ({type(err).__name__}: {err})") from None


class Removal(NamedTuple):
    reason: str  # "exact_duplicate" or "near_duplicate"
    kept_shard: int  # where the document kept in its place is: shard, and index in that shard's stream
    kept_index: int


def load_removals(path: Path) -> dict[int, Removal]:
    """Document index in the shard's stream -> why it goes and which document is kept in its place."""
    removals = _read_removals(path)
    return {i: Removal(REASONS[r], s, k) for i, r, s, k in
            zip(removals["index"], removals["reason"], removals["kept_shard"], removals["kept_index"])}
