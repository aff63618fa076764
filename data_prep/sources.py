"""Where documents come from: local files and tar archives, Hugging Face datasets (streamed), the embedded
stdlib corpus.

Documents are dicts `{"text", "id", "source", "kind", "stage"}` where `id` is `file:line` (or
`archive:member`, or `dataset:index`), so anything the pipeline removes later can be traced back. Records that cannot
be read are skipped and counted in the step report with their location (or raise a one-line
`DataError` under `--strict`); nothing is dropped silently.

Sharding: shard k of N reads every N-th file when there are at least N files, otherwise every
N-th record (or archive member), so shards are disjoint and together cover each source exactly once.
Mixture: the sources of one curriculum stage are interleaved with `datasets.interleave_datasets`
using their weights as probabilities; stages follow one another in order.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import gzip
import io
import json
import lzma
import math
import os
import sysconfig
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import zstandard

from data_prep.config import CODE_EXTENSIONS, ConfigError, MixtureConfig, SourceConfig
from data_prep.report import StepReport

RECORD_FEATURES = datasets.Features({
    "source": datasets.Value("string"),
    "stage": datasets.Value("int64"),
    "text": datasets.Value("string"),
    "id": datasets.Value("string"),
    "kind": datasets.Value("string"),
    "skip": datasets.Value("string"),
    "nbytes": datasets.Value("int64"),
})
# Paths a directory walk passes over that are not bad input: counted, but not fatal under --strict.
PASSED_OVER = {"other_extension", "no_matching_files", "empty_directory", "unselected_member", "link_member",
               "special_member"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TEXT_SNIFF_BYTES = 8192


def _has_suffix(path: Path, suffixes: tuple[str, ...] | list[str]) -> bool:
    """Case-insensitive: `.S` selects `entry.S` and `.py` selects `SETUP.PY`."""
    name = path.name.lower()
    return any(name.endswith(s.lower()) for s in suffixes)


def scan_paths(source: SourceConfig) -> tuple[list[Path], list[tuple[str, str]]]:
    """Resolve a local source's paths (files, globs, directories) to a sorted list of files.

    Also returns every path that was passed over, with the reason: `dangling_symlink`,
    `symlink_loop`, `empty_directory`, `other_extension` (a file in a directory that `extensions`
    does not select), `no_matching_files` (a directory none of whose files is selected). Symbolic
    links to directories are followed, each real directory once. A source that yields no file at
    all is a one-line `ConfigError` that says what was skipped.
    """
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for pattern in source.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.lexists(matches[0]):
            raise ConfigError(f"sources.{source.name}.paths: {pattern} matches no file")
        for match in map(Path, matches):
            problem = _path_problem(match)
            if problem:
                skipped.append((str(match), problem))
            elif match.is_dir():
                _walk(match, source.extensions, files, skipped, set())
            else:
                files.append(match)
    if not files:
        counts = Counter(reason for _, reason in skipped)
        what = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        raise ConfigError(f"sources.{source.name}.paths: no file to read ({what or 'nothing found'}; "
                          f"e.g. {skipped[0][0] if skipped else source.paths[0]})")
    return files, skipped


def _path_problem(path: Path) -> str:
    """Why `path` cannot be followed (a broken or looping link), or "" when it can."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink_loop"
        return "dangling_symlink" if path.is_symlink() else f"unreadable_path ({errno.errorcode.get(err.errno, err)})"
    return ""


def _walk(directory: Path, extensions: list[str], files: list[Path], skipped: list[tuple[str, str]],
          ancestors: set[tuple[int, int]]) -> bool:
    """Add the selected files under `directory` in sorted order; True when it had at least one."""
    info = directory.stat()
    key = (info.st_dev, info.st_ino)
    if key in ancestors:  # a link back to a directory we are inside of
        skipped.append((str(directory), "symlink_loop"))
        return False
    entries = sorted(directory.iterdir())
    if not entries:
        skipped.append((str(directory), "empty_directory"))
        return False
    found, passed_over = False, []
    for path in entries:
        problem = _path_problem(path)
        if problem:
            skipped.append((str(path), problem))
        elif path.is_dir():
            found |= _walk(path, extensions, files, skipped, ancestors | {key})
        elif _has_suffix(path, extensions):
            files.append(path)
            found = True
        else:
            passed_over.append((str(path), "other_extension"))
    if found or not passed_over:
        skipped.extend(passed_over)
    else:  # one entry for a directory that gives nothing, not one per file in it
        skipped.append((str(directory), "no_matching_files"))
    return found


def stdlib_files() -> tuple[list[Path], dict[str, str]]:
    """The interpreter's standard-library sources and pydoc topics: real code and English prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "__pycache__" not in p.parts]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    return files, dict(sorted(topics.items()))


# ---------------------------------------------------------------------------------------------
# Record readers. Each yields (where, text or None, nbytes, reason) so the caller decides to keep,
# count or raise; `reason` is set when the record is unreadable.
# ---------------------------------------------------------------------------------------------

class _ZstdFrames(io.RawIOBase):
    """Every frame of a .zst file in turn (`zstd` and parallel compressors write several). Data that
    ends inside a frame raises EOFError, as gzip does; zstandard's stream reader would just stop."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame, self._pending, self._offset = False, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._file.read(1 << 17)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed data ends inside a zstd frame")
                return 0
            parts = []
            while chunk:
                parts.append(self._frame.decompress(chunk))
                self._in_frame = not self._frame.eof
                chunk = self._frame.unused_data if self._frame.eof else b""
                if self._frame.eof:
                    self._frame = zstandard.ZstdDecompressor().decompressobj()
            self._pending, self._offset = b"".join(parts), 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = memoryview(self._pending)[self._offset : self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


def _lines_with_limit(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line number, line, size); an over-long line is drained in chunks and yields None."""
    lineno = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            size = len(line)
            while True:
                chunk = handle.readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield lineno, None, size
        else:
            yield lineno, line, len(line)


def read_jsonl(path: Path, text_field: str, max_doc_bytes: int) -> Iterator[tuple[str, str | None, int, str]]:
    """Records of a JSON-lines file (plain, gzip or zstd). A file that stops being readable part way
    (truncated or corrupt compressed data) gives its readable records, then one `unreadable_file`
    entry located at the first line it could not read."""
    lineno = 0
    try:
        handle = _open_binary(path)
        with handle:
            for lineno, line, size in _lines_with_limit(handle, max_doc_bytes):
                where = f"{path}:{lineno}"
                if line is None:
                    yield where, None, size, "oversized_document"
                    continue
                if not line.strip():
                    continue  # blank separator lines are not records
                try:
                    # utf-8-sig: a byte order mark (Windows editors write one at the start of a file) is not text.
                    record = json.loads(line.decode("utf-8-sig"))
                except UnicodeDecodeError:
                    yield where, None, size, "non_utf8"
                    continue
                except json.JSONDecodeError:
                    yield where, None, size, "malformed_json"
                    continue
                if not isinstance(record, dict) or text_field not in record:
                    yield where, None, size, "missing_text_field"
                elif not isinstance(record[text_field], str):
                    yield where, None, size, "text_field_not_string"
                else:
                    yield where, record[text_field], size, ""
    except (OSError, EOFError, zstandard.ZstdError) as err:
        where = f"{path}:{lineno + 1}" if lineno else str(path)
        yield where, None, 0, f"unreadable_file ({type(err).__name__})"


def read_parquet(path: Path, text_field: str, max_doc_bytes: int) -> Iterator[tuple[str, str | None, int, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        yield str(path), None, 0, f"unreadable_file ({type(err).__name__})"
        return
    if text_field not in parquet.schema_arrow.names:
        yield str(path), None, 0, "missing_text_field"
        return
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row{row}"
            if not isinstance(value, str):
                yield where, None, 0, "missing_text_field"
                continue
            size = len(value.encode("utf-8", "surrogatepass"))
            yield (where, None, size, "oversized_document") if size > max_doc_bytes else (where, value, size, "")


def _as_document(file: str, data: bytes, size: int, suffix: str = ":1") -> tuple[str, str | None, int, str]:
    """One whole-file document from its bytes, with id `file + suffix`; binary data and non-UTF-8 bytes are
    refused with their reason (a bad byte located as `file:line`)."""
    if b"\x00" in data[:TEXT_SNIFF_BYTES]:
        return file + suffix, None, size, "binary_file"
    try:
        return file + suffix, data.decode("utf-8").removeprefix("\ufeff"), size, ""
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"{file}:{line}", None, size, "non_utf8"


def read_text_file(path: Path, max_doc_bytes: int) -> Iterator[tuple[str, str | None, int, str]]:
    """A whole file is one document: source files, books, articles."""
    where = f"{path}:1"
    try:
        size = path.stat().st_size
        if size > max_doc_bytes:
            yield where, None, size, "oversized_document"
            return
        data = path.read_bytes()
    except OSError as err:
        yield str(path), None, 0, f"unreadable_file ({type(err).__name__})"
        return
    yield _as_document(str(path), data, size)


def is_archive(path: Path) -> bool:
    return _has_suffix(path, ARCHIVE_SUFFIXES)


def _member_name(name: str) -> str:
    """A member path as text: bytes that are not UTF-8 (tarfile keeps them as surrogates) become escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_archive(path: Path, max_doc_bytes: int, extensions: list[str] | None = None,
                 members: list[str] | None = None) -> Iterator[tuple[str, str | None, int, str]]:
    """Every regular member of a tar archive (plain, gzip, bzip2, xz or zstd) as one document, streamed: nothing
    is extracted to disk and only one member is in memory at a time. Ids are `archive:member/path`.

    Members are selected by `extensions` (None: any) and `members`, shell-style globs on the member path where
    `*` also crosses `/` (empty: any). Members passed over are counted (`other_extension`, `unselected_member`,
    `link_member` for symbolic and hard links, `special_member` for devices and fifos); directories are not
    documents. An archive that stops being readable part way gives its readable members, then one
    `truncated_archive` (or `unreadable_archive (error)`) entry naming the member it broke in.
    """
    last = ""
    try:
        with open(path, "rb") as raw:
            zstd = raw.read(4) == ZSTD_MAGIC
            raw.seek(0)
            stream = io.BufferedReader(_ZstdFrames(path)) if zstd else raw
            with stream, tarfile.open(fileobj=stream, mode="r|" if zstd else "r|*") as archive:
                for info in archive:
                    archive.members.clear()  # stream mode keeps every header otherwise
                    if info.isdir():
                        continue
                    last = _member_name(info.name)
                    where = f"{path}:{last}"
                    if not info.isfile():
                        yield where, None, 0, "link_member" if info.islnk() or info.issym() else "special_member"
                    elif members and not any(fnmatch.fnmatchcase(last, pattern) for pattern in members):
                        yield where, None, 0, "unselected_member"
                    elif extensions is not None and not _has_suffix(Path(last), extensions):
                        yield where, None, 0, "other_extension"
                    elif info.size > max_doc_bytes:
                        yield where, None, info.size, "oversized_document"
                    elif info.size == 0:
                        yield where, None, 0, "empty_file"
                    else:
                        data = archive.extractfile(info).read()  # type: ignore[union-attr]
                        yield _as_document(where, data, info.size, suffix="")
                    last = ""  # read to its end: a failure from here on is in the next header
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as err:
        truncated = isinstance(err, EOFError) or "unexpected end of data" in str(err)
        where = f"{path}:{last}" if last else f"{path} (after the last complete member)"
        yield where, None, 0, "truncated_archive" if truncated else f"unreadable_archive ({type(err).__name__})"


def read_file(path: Path, text_field: str, max_doc_bytes: int, extensions: list[str] | None = None,
              members: list[str] | None = None) -> Iterator[tuple[str, str | None, int, str]]:
    """The records of one file: JSON lines, parquet rows, tar archive members (selected by `extensions` and
    `members`) or the whole file as one document."""
    if is_archive(path):
        return read_archive(path, max_doc_bytes, extensions, members)
    if _has_suffix(path, JSONL_SUFFIXES):
        return read_jsonl(path, text_field, max_doc_bytes)
    if _has_suffix(path, (".parquet",)):
        return read_parquet(path, text_field, max_doc_bytes)
    return read_text_file(path, max_doc_bytes)


# ---------------------------------------------------------------------------------------------
# Sources as record streams for one shard.
#
# Readers run inside `datasets` generators, which copy their arguments, so they cannot update a
# report object of the caller. Instead every record travels in-band: good documents with
# `skip == ""`, unreadable ones with the reason in `skip`, and one `END_OF_SOURCE` marker when a
# source has been read to its end. `account()` turns that stream into documents plus a report.
# ---------------------------------------------------------------------------------------------

END_OF_SOURCE = "end_of_source"


def _records(source: SourceConfig, shard_index: int, num_shards: int,
             max_doc_bytes: int) -> Iterator[tuple[str, str | None, int, str, str]]:
    """(where, text, nbytes, reason, kind) for every record shard `shard_index` owns."""
    k, n = shard_index, num_shards
    if source.type == "hub":
        yield from _hub_records(source, k, n)
        return
    if source.type == "stdlib":
        files, topics = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        items: list[tuple[str, Any]] = [("file", f) for f in files] + [("topic", t) for t in topics]
        for i, (what, item) in enumerate(items):
            if i % n != k:
                continue
            if what == "file":
                # Ids relative to the stdlib root keep the train/validation split the same on every machine.
                for where, *rest in read_text_file(item, max_doc_bytes):
                    yield (f"<stdlib>/{Path(where).relative_to(root)}", *rest, "code")
            else:
                text = topics[item]
                yield f"pydoc_data/topics:{item}", text, len(text.encode("utf-8")), "", "text"
        return
    files, skipped = scan_paths(source)
    if k == 0:  # paths passed over are counted once, by the first shard
        for where, reason in skipped:
            yield where, None, 0, reason, source.kind
    by_file = len(files) >= n
    record_index = 0
    for file_index, path in enumerate(files):
        if by_file and file_index % n != k:
            continue
        any_record, archive = False, is_archive(path)
        for rec in read_file(path, source.text_field, max_doc_bytes, source.extensions, source.members):
            any_record = True
            owned = by_file or record_index % n == k
            record_index += 1
            if owned:
                yield (*rec, _kind(source, rec[0][len(str(path)) + 1:] if archive else path.name))
        if not any_record and (by_file or k == 0):
            yield str(path), None, 0, "empty_file", _kind(source, path.name)


def _kind(source: SourceConfig, name: str) -> str:
    """The kind of a document read from the file (or archive member) called `name`."""
    if source.kind != "auto":
        return source.kind
    return "code" if _has_suffix(Path(name), CODE_EXTENSIONS) else "text"


def _hub_records(source: SourceConfig, k: int, n: int) -> Iterator[tuple[str, str | None, int, str, str]]:
    ds = datasets.load_dataset(source.path, name=source.config_name, split=source.split,
                               revision=source.revision, streaming=True)
    by_shard = ds.num_shards >= n
    if by_shard and n > 1:
        ds = ds.shard(num_shards=n, index=k)
    for i, example in enumerate(ds):
        if not by_shard and i % n != k:
            continue
        where = f"{source.path}:{k}/{i}" if by_shard and n > 1 else f"{source.path}:{i}"
        value = example.get(source.text_field)
        if source.text_field not in example:
            yield where, None, 0, "missing_text_field", source.kind
        elif not isinstance(value, str):
            yield where, None, 0, "text_field_not_string", source.kind
        else:
            yield where, value, len(value.encode("utf-8", "surrogatepass")), "", source.kind


def source_records(source: SourceConfig, shard_index: int = 0, num_shards: int = 1,
                   max_doc_bytes: int = 10_000_000) -> Iterator[dict[str, Any]]:
    """One source's records for one shard, in-band accounting included (see `account`).

    `max_docs` caps the documents this source contributes over all shards (split evenly).
    """
    limit = math.ceil(source.max_docs / num_shards) if source.max_docs else None
    docs = 0
    base = {"source": source.name, "stage": source.stage}
    for where, text, nbytes, reason, kind in _records(source, shard_index, num_shards, max_doc_bytes):
        if limit is not None and docs >= limit:
            return  # capped, not exhausted: no END_OF_SOURCE, so the report says "not read to end"
        if not reason and text is not None and text.strip():
            docs += 1
        yield {**base, "text": text or "", "id": where, "kind": kind, "skip": reason, "nbytes": nbytes}
    yield {**base, "text": "", "id": "", "kind": source.kind, "skip": END_OF_SOURCE, "nbytes": 0}


def _as_iterable_dataset(source: SourceConfig, shard_index: int, num_shards: int,
                         max_doc_bytes: int) -> datasets.IterableDataset:
    return datasets.IterableDataset.from_generator(
        source_records, features=RECORD_FEATURES,
        gen_kwargs={"source": source, "shard_index": shard_index, "num_shards": num_shards,
                    "max_doc_bytes": max_doc_bytes})


def mixed_records(sources: list[SourceConfig], mixture: MixtureConfig, shard_index: int = 0, num_shards: int = 1,
                  max_doc_bytes: int = 10_000_000) -> Iterator[dict[str, Any]]:
    """The shard's record stream: curriculum stages in order, sources within a stage interleaved by weight.

    A stage with a single source is read directly; several are mixed with
    `datasets.interleave_datasets(probabilities=weights / sum(weights))`.
    """
    for stage in sorted({s.stage for s in sources}):
        members = [s for s in sources if s.stage == stage]
        if len(members) == 1:
            yield from source_records(members[0], shard_index, num_shards, max_doc_bytes)
            continue
        total = sum(s.weight for s in members)
        yield from datasets.interleave_datasets(
            [_as_iterable_dataset(s, shard_index, num_shards, max_doc_bytes) for s in members],
            probabilities=[s.weight / total for s in members],
            seed=mixture.seed + 1000 * stage + shard_index,
            stopping_strategy=mixture.stopping_strategy,
        )


def account(records: Iterator[dict[str, Any]], report: StepReport,
            sources: list[SourceConfig]) -> Iterator[dict[str, Any]]:
    """Count every record in `report` and yield the readable, non-empty documents.

    Unreadable records and empty documents are counted by reason with their location (or raise a
    one-line `DataError` under strict mode). Afterwards `report.extra` holds `docs_from/<source>`
    for each source and `not_read_to_end/<source>` for sources the mixture stopped early (a
    `first_exhausted` mixture, or `max_docs`).
    """
    finished: set[str] = set()
    for source in sources:
        report.extra[f"docs_from/{source.name}"] += 0
    for record in records:
        reason, where = record.pop("skip"), record["id"]
        nbytes = record.pop("nbytes")
        if reason == END_OF_SOURCE:
            finished.add(record["source"])
            continue
        if reason:
            report.skip_input(reason, where, nbytes, source=record["source"], fatal_in_strict=reason not in PASSED_OVER)
            continue
        text = record["text"]
        report.seen(text, record["source"])
        if not text.strip():
            report.remove("empty_document", where, fatal_in_strict=True, source=record["source"])
            continue
        report.kept(text, record["source"])
        report.extra[f"docs_from/{record['source']}"] += 1
        yield record
    for source in sources:
        if source.name not in finished:
            report.extra[f"not_read_to_end/{source.name}"] += 1
