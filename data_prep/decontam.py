"""Evaluation-set decontamination: drop training documents that share a word n-gram with an eval set.

Every file in `decontam.eval_files` is read with the pipeline's own readers (`.jsonl`, `.jsonl.gz`,
`.jsonl.zst` and `.ndjson` take `decontam.text_field` from each record, `.parquet` that column, any other file
is one document) and every eval document becomes a sorted numpy array of hashed word n-grams
(n = `decontam.ngram`, 13 by default). Words are those of near-duplicate detection (`dedup.normalized_words`):
lowercased, punctuation removed, diacritics folded, split on whitespace; numbers are kept. An eval document
shorter than n words counts as one n-gram of all its words, so a training document containing those words in a
row matches it; a very short eval document (a one-word answer) therefore matches a lot, which the report's
`contaminated:<file>` counts make visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.config import ConfigError, DecontamConfig
from data_prep.dedup import ngram_hashes, normalized_words, word_hashes
from data_prep.sources import read_file

# Eval sets are trusted input read once; no per-record size cap.
_NO_SIZE_LIMIT = 1 << 40


def _contains_any(sorted_known: np.ndarray, values: np.ndarray) -> bool:
    positions = np.minimum(np.searchsorted(sorted_known, values), len(sorted_known) - 1)
    return bool((sorted_known[positions] == values).any())


class Decontaminator:
    """Flags documents sharing an n-gram with any eval file; `check` names the first such file."""

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        # Per eval file: its name and, per n-gram length, the sorted n-gram hashes. The length is `ngram`
        # except for eval documents shorter than that.
        self.tables: list[tuple[str, dict[int, np.ndarray]]] = [
            (Path(path).name, self._load(i, Path(path))) for i, path in enumerate(cfg.eval_files)
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.tables)

    def _load(self, file_number: int, path: Path) -> dict[int, np.ndarray]:
        key = f"decontam.eval_files.{file_number}"
        if not path.is_file():
            raise ConfigError(f"{key}: {path}: eval file not found")
        by_length: dict[int, list[np.ndarray]] = {}
        for where, text, _, reason in read_file(path, self.cfg.text_field, _NO_SIZE_LIMIT):
            if reason:
                raise ConfigError(f"{key}: {where}: cannot read eval record ({reason})")
            hashes = word_hashes(normalized_words(text))
            if len(hashes):
                by_length.setdefault(min(len(hashes), self.cfg.ngram), []).append(
                    ngram_hashes(hashes, self.cfg.ngram))
        if not by_length:
            raise ConfigError(f"{key}: {path}: eval file has no text (field {self.cfg.text_field!r})")
        return {length: np.unique(np.concatenate(parts)) for length, parts in sorted(by_length.items())}

    def check(self, text: str) -> str | None:
        """"contaminated:<eval file name>" if `text` shares an n-gram with an eval file, else None."""
        if not self.tables:
            return None
        hashes = word_hashes(normalized_words(text))
        ngrams_by_length: dict[int, np.ndarray] = {}
        for name, table in self.tables:
            for length, known in table.items():
                if len(hashes) < length:
                    continue
                if length not in ngrams_by_length:
                    ngrams_by_length[length] = ngram_hashes(hashes, length)
                if _contains_any(known, ngrams_by_length[length]):
                    return f"contaminated:{name}"
        return None
