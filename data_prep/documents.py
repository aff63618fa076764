"""Reading documents back for evaluation and streaming: files, folders, `documents/<split>/` and Hub datasets.

    from data_prep.documents import read_documents, open_document_stream
    texts = read_documents("outputs/data/stdlib/documents/validation")        # every document, in file order
    stream = open_document_stream("outputs/data/stdlib/documents/train", rank=0, world_size=2)   # one rank's share

A local source is a file or a folder of files (searched recursively, read in name order): `.txt` (a whole file
is one document), `.jsonl` / `.jsonl.gz` / `.jsonl.zst` / `.ndjson` (one document per line, from `text_field`;
blank lines are not records) and `.parquet` (one per row). Records are parsed by the same readers the
pipeline's sources use (`data_prep.sources.read_file`). Anything else is a Hub dataset name.

`read_documents` is strict: a record it cannot read is a one-line ValueError naming `file:line` and what is
wrong, because a score over silently fewer documents would not be the score asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import datasets.distributed

from cli import error_line
from data_prep.sources import JSONL_SUFFIXES, read_file

DOCUMENT_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
# Evaluation reads documents whatever their size; the pipeline's `max_doc_bytes` is a cleaning rule.
_NO_SIZE_LIMIT = 1 << 62
_REASONS = {"malformed_json": "not valid JSON", "non_utf8": "not UTF-8 text", "binary_file": "a binary file",
            "missing_text_field": "no {field!r} field", "text_field_not_string": "field {field!r} is not a string"}


def document_files(path: str | Path) -> list[Path]:
    """The document files of a file or folder (recursively, sorted); a one-line ValueError when there are none."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(DOCUMENT_SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no document files ({', '.join(DOCUMENT_SUFFIXES)}) in this folder")
    return files


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Every document of a local file or folder (see the module docstring), strictly."""
    for file in document_files(path):
        for where, text, _, reason in read_file(file, text_field, _NO_SIZE_LIMIT):
            if reason:
                message = _REASONS.get(reason, reason.replace("_", " ")).format(field=text_field)
                raise ValueError(f"{where}: {message}")
            yield text


def read_hub_documents(name: str, config: str | None = None, split: str = "test", text_field: str = "text"
                       ) -> Iterator[str]:
    """Documents of a Hugging Face Hub dataset split, streamed, e.g. ("Salesforce/wikitext", "wikitext-2-raw-v1")."""
    for index, record in enumerate(_load_hub(name, config, split)):
        value = record.get(text_field)
        if not isinstance(value, str):
            problem = "no" if text_field not in record else "a non-string"
            raise ValueError(f"{name}[{split}] row {index}: {problem} {text_field!r} field")
        yield value


def _load_hub(name: str, config: str | None, split: str) -> datasets.IterableDataset:
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # offline, no such repo, wrong split: one line, not datasets' stack
        raise ValueError(f"{name}: not a local file or folder, nor a loadable Hub dataset ({error_line(err)})") from err


def open_document_stream(source: str | Path, *, text_field: str = "text", split: str = "train", rank: int = 0,
                         world_size: int = 1) -> datasets.IterableDataset:
    """This rank's share of a document stream, the input of `StreamingPackedDataset`, resumable by `datasets`.

    `source` is a local file or folder of .jsonl(.gz/.zst) or .parquet documents with a `text_field` column
    (`python -m data_prep`'s `documents/train`), else a Hub dataset name (`split`). Ranks split the stream with
    `datasets.distributed.split_dataset_by_node`: whole files when their count divides by `world_size`, else
    every rank reads all and keeps one document in `world_size`.
    """
    if Path(source).exists():
        files = document_files(source)
        if any(p.name.lower().endswith(".txt") for p in files):
            raise ValueError(f"{source}: streaming reads .jsonl/.parquet documents, not .txt files")
        builder = "parquet" if all(p.suffix == ".parquet" for p in files) else "json"
        stream = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True)
    else:
        stream = _load_hub(str(source), None, split)
    if text_field != "text":
        stream = stream.rename_column(text_field, "text")
    return datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world_size)
