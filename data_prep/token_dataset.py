"""Training datasets over packed token blocks: memory-mapped shards, or packing on the fly.

Both datasets yield the same examples. Block i of a token stream is stream[i*seq_len : i*seq_len + seq_len + 1]
(see `data_prep.packing`), and an example is

    {"input_ids": block[:-1], "shift_labels": block[1:]}            (torch.long, length seq_len each)
    + "position_ids": positions that restart at 0 at the block start and after every EOS (optional)

`shift_labels` are already shifted, so every one of the seq_len positions has a target, including
the last one that `labels=input_ids` would lose. transformers' `ForCausalLMLoss` uses `shift_labels`
as given when it is passed. `position_ids` only change what the model sees when the attention
implementation reads document boundaries from them (flash-attention's packed-sequence path);
otherwise they merely restart the rotary positions at each document.

Distributed training: `PackedDataset` is a map-style dataset, so the usual `DistributedSampler`
(which the Trainer sets up) splits it. `StreamingPackedDataset` does not split across ranks itself:
split its document source per rank first, e.g. `datasets.distributed.split_dataset_by_node`.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data_prep.config import PackConfig
from data_prep.packing import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FimSpec,
    concat_with_eos,
    token_dtype,
    tokenize_documents,
    tokenizer_fingerprint,
)


def document_position_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """0, 1, 2, ... restarting at the first token and at every token that follows an EOS."""
    index = np.arange(len(input_ids))
    starts_document = np.zeros(len(input_ids), dtype=bool)
    starts_document[0] = True
    starts_document[1:] = input_ids[:-1] == eos_id
    document_start = np.maximum.accumulate(np.where(starts_document, index, 0))
    return index - document_start


def block_to_example(block: np.ndarray, eos_id: int, return_position_ids: bool = False) -> dict[str, torch.Tensor]:
    """One `seq_len + 1` block -> {"input_ids", "shift_labels"[, "position_ids"]} as LongTensors."""
    # Two separate copies, so editing one in place (masking, say) cannot change the other.
    example = {"input_ids": torch.from_numpy(block[:-1].astype(np.int64)),
               "shift_labels": torch.from_numpy(block[1:].astype(np.int64))}
    if return_position_ids:
        example["position_ids"] = torch.from_numpy(document_position_ids(block[:-1], eos_id))
    return example


def _shard_json(path: Path) -> Path:
    """The metadata file of a shard given as a prefix, `<prefix>.json` or `<prefix>.bin`."""
    name = path.name
    for suffix in (".json", ".bin", ".idx.npy"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")


def is_packed_shards(path: str | Path) -> bool:
    """Whether `path` is a packed token shard (or a folder of them) rather than documents."""
    path = Path(path)
    if path.is_dir():
        return any(p.with_suffix(".bin").is_file() for p in path.glob("*.json"))
    return path.name.endswith((".bin", ".json", ".idx.npy"))


def _find_shards(paths: str | Path | list) -> list[Path]:
    """Metadata files of the complete shards named by `paths` (directories expand to their sorted shards)."""
    found: list[Path] = []
    for path in map(Path, paths if isinstance(paths, (list, tuple)) else [paths]):
        if path.is_dir():
            # A shard is complete once its .json exists; other JSON files in the folder are not shards.
            found.extend(p for p in sorted(path.glob("*.json")) if p.with_suffix(".bin").is_file())
        else:
            json_path = _shard_json(path)
            if not json_path.is_file():
                raise ValueError(f"{json_path}: no such packed shard (a .bin without .json is incomplete)")
            found.append(json_path)
    if not found:
        raise ValueError(f"{paths}: no complete packed shards found")
    return found


def _load_metadata(json_path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{json_path}: unreadable shard metadata ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{json_path}: not a packed token shard (format is not {FORMAT_NAME!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{json_path}: format_version {metadata.get('format_version')} is not {FORMAT_VERSION}")
    bin_path = json_path.with_suffix(".bin")
    expected_bytes = metadata["num_tokens"] * np.dtype(metadata["dtype"]).itemsize
    actual_bytes = bin_path.stat().st_size if bin_path.is_file() else -1
    if actual_bytes != expected_bytes:
        raise ValueError(f"{bin_path}: {actual_bytes} bytes, metadata says {expected_bytes} (truncated or missing)")
    return metadata


class PackedDataset(Dataset):
    """Map-style dataset over packed shards: example i is block i of the shards taken in order.

    Shards are memory-mapped lazily, once per process, so the dataset pickles cheaply into DataLoader
    workers and each worker opens its own maps after fork/spawn. Indexing is O(1) apart from a bisect
    over the shards' cumulative block counts.
    """

    def __init__(self, paths: str | Path | list, *, return_position_ids: bool = False,
                 expected_fingerprint: str | None = None, seq_len: int | None = None):
        self.return_position_ids = return_position_ids
        self.shard_paths = _find_shards(paths)
        self.shards = [_load_metadata(p) for p in self.shard_paths]
        first, first_path = self.shards[0], self.shard_paths[0]
        checks = {
            "tokenizer_fingerprint": (expected_fingerprint, "expected"),
            "seq_len": (seq_len, "requested"),
        }
        for key, (wanted, why) in checks.items():
            if wanted is not None and first[key] != wanted:
                raise ValueError(f"{first_path}: {key} {first[key]!r} differs from the {why} {wanted!r}")
        for path, shard in zip(self.shard_paths[1:], self.shards[1:]):
            for key in ("tokenizer_fingerprint", "seq_len", "vocab_size", "eos_id"):
                if shard[key] != first[key]:
                    raise ValueError(f"{path}: {key} {shard[key]!r} differs from {first[key]!r} in {first_path}")
        self.seq_len: int = first["seq_len"]
        self.eos_id: int = first["eos_id"]
        self._block_ends = np.cumsum([s["num_blocks"] for s in self.shards]).tolist()
        self._arrays: list[np.ndarray | None] = []
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._block_ends[-1]

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s["num_documents"] for s in self.shards)

    @property
    def metadata(self) -> dict[str, Any]:
        """Settings shared by all shards, the totals, and each shard's own metadata under "shards"."""
        first = self.shards[0]
        shared = {k: first[k] for k in ("seq_len", "vocab_size", "eos_id", "tokenizer_fingerprint")}
        return {**shared, "num_tokens": self.num_tokens, "num_documents": self.num_documents,
                "num_blocks": len(self), "remainder_tokens": sum(s["remainder_tokens"] for s in self.shards),
                "shards": [{"path": str(p), **s} for p, s in zip(self.shard_paths, self.shards)]}

    def _array(self, shard: int) -> np.ndarray:
        if self._pid != os.getpid():  # first use in this process (e.g. a freshly forked worker)
            self._arrays = [None] * len(self.shards)
            self._pid = os.getpid()
        array = self._arrays[shard]
        if array is None:
            metadata = self.shards[shard]
            array = np.memmap(self.shard_paths[shard].with_suffix(".bin"), dtype=np.dtype(metadata["dtype"]),
                              mode="r", shape=(metadata["num_tokens"],))
            self._arrays[shard] = array
        return array

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        shard = bisect.bisect_right(self._block_ends, index)
        local = index - (self._block_ends[shard - 1] if shard else 0)
        start = local * self.seq_len
        block = self._array(shard)[start:start + self.seq_len + 1]
        return block_to_example(block, self.eos_id, self.return_position_ids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = [], None  # memmaps are reopened in the receiving process
        return state


class StreamingPackedDataset(IterableDataset):
    """Tokenizes and packs documents on the fly; the examples equal `PackedDataset`'s on the same documents.

    `source` is a `datasets.IterableDataset` of {"text", "kind"} rows or any re-iterable of such dicts.
    Documents are tokenized `cfg.batch_docs` at a time. FIM draws are seeded by the document's position
    in the source, exactly as `pack_documents` does for a shard.

    Exact resume: `state_dict()` after k examples, then `load_state_dict()` on a fresh instance built
    the same way, and its iteration yields example k+1 onwards. The state holds where the current
    document batch began upstream (the `datasets` state, or a document count for plain iterables, which
    are re-read and skipped), how many of that batch's documents lie wholly before the next block, and
    the tokens of the next block already read from earlier documents (shorter than seq_len + one document).
    Caveats inherited from `datasets`: a shuffle buffer is not part of its state (resumed shuffled
    streams differ), and with DataLoader workers each worker has its own state (use torchdata's
    `StatefulDataLoader`, which collects them). Plain iterables are split across DataLoader workers
    document by document; a `datasets.IterableDataset` splits by its shards.
    """

    def __init__(self, source: Iterable[dict] | datasets.IterableDataset, tokenizer, cfg: PackConfig | None = None,
                 *, return_position_ids: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token; packing needs one to separate documents")
        self.source = source
        self.tokenizer = tokenizer
        self.cfg = cfg or PackConfig()
        self.return_position_ids = return_position_ids
        self.seq_len = self.cfg.seq_len
        self.eos_id: int = tokenizer.eos_token_id
        self.dtype = token_dtype(len(tokenizer))
        self.fim = FimSpec.from_config(self.cfg, tokenizer)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        # A loaded state waiting for the next iteration; where the latest iteration started; and the
        # document batch it is in plus the offset of its next block (turned into a state on demand).
        self._resume: dict[str, Any] | None = None
        self._started_from: dict[str, Any] | None = None
        self._progress: tuple[dict[str, Any], int] | None = None
        self._source_state_loaded = False

    def _start_state(self) -> dict[str, Any]:
        return {"upstream": None, "position": 0, "skip_docs": 0, "carry": []}

    def state_dict(self) -> dict[str, Any]:
        """Where the next example starts; small (no document batch is stored)."""
        if self._resume is not None or self._progress is None:
            state = dict(self._resume or self._started_from or self._start_state())
        else:
            batch, next_start = self._progress
            carry_len, ends = batch["carry_len"], batch["ends"]
            if next_start < carry_len:  # the next block starts in tokens carried from earlier batches
                skip_docs, carry_end = 0, carry_len
            else:
                document = int(np.searchsorted(ends, next_start, side="right"))
                skip_docs, carry_end = document + 1, int(ends[document])
            carry = batch["buffer"][next_start:carry_end].tolist()
            state = {"upstream": batch["upstream"], "position": batch["position"], "skip_docs": skip_docs,
                     "carry": carry}
        return {**state, "seq_len": self.seq_len, "tokenizer_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue where `state` was taken."""
        for key, mine in (("seq_len", self.seq_len), ("tokenizer_fingerprint", self.fingerprint)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict.{key}: {state.get(key)!r} does not match this dataset's {mine!r}")
        self._resume = {k: state[k] for k in ("upstream", "position", "skip_docs", "carry")}

    def _documents(self, start: dict[str, Any]) -> Iterator[tuple[int, dict]]:
        """(position, document) pairs from the resume point on; positions count source documents."""
        if isinstance(self.source, datasets.IterableDataset):
            # datasets keeps a loaded state for every later iteration; reset it when starting afresh.
            if start["upstream"] is not None or self._source_state_loaded:
                self.source.load_state_dict(start["upstream"])
                self._source_state_loaded = start["upstream"] is not None
            yield from enumerate(self.source, start=start["position"])
            return
        worker = get_worker_info()
        documents = enumerate(islice(self.source, start["position"], None), start=start["position"])
        if worker is None or worker.num_workers == 1:
            yield from documents
        else:
            yield from ((i, doc) for i, doc in documents if i % worker.num_workers == worker.id)

    def _upstream_state(self) -> dict | None:
        return self.source.state_dict() if isinstance(self.source, datasets.IterableDataset) else None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self._resume or self._start_state()
        self._resume, self._started_from, self._progress = None, start, None
        seq_len = self.seq_len
        documents = self._documents(start)
        upstream, position = start["upstream"], start["position"]
        skipped = list(islice(documents, start["skip_docs"]))
        if skipped:  # documents whose tokens before the next block are in `carry`
            upstream, position = self._upstream_state(), skipped[-1][0] + 1
        carry = np.asarray(start["carry"], dtype=self.dtype)
        batch_size = max(1, self.cfg.batch_docs)
        while True:
            batch = list(islice(documents, batch_size))
            positions = [p for p, _ in batch]
            token_lists, _ = tokenize_documents([d for _, d in batch], self.tokenizer, self.fim, positions)
            stream, ends = concat_with_eos(token_lists, self.eos_id, self.dtype)
            buffer = np.concatenate([carry, stream])
            progress = {"upstream": upstream, "position": position, "carry_len": len(carry),
                        "ends": ends + len(carry), "buffer": buffer}
            offset = 0
            while offset + seq_len + 1 <= len(buffer):
                block = buffer[offset:offset + seq_len + 1]
                offset += seq_len
                self._progress = (progress, offset)
                yield block_to_example(block, self.eos_id, self.return_position_ids)
            if not batch:  # the source is exhausted and the carry (restored or left over) is used up
                return
            carry = buffer[offset:]
            upstream, position = self._upstream_state(), positions[-1] + 1
