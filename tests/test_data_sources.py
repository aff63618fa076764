"""Sources: every input format, bad input counted with file:line (or a one-line error under strict),
sharding that covers each record exactly once, mixture proportions, the embedded stdlib corpus."""

import gzip
import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.config import ConfigError, MixtureConfig, SourceConfig
from data_prep.report import DataError, StepReport
from data_prep.sources import account, mixed_records, source_records, stdlib_files


def read(sources, shard_index=0, num_shards=1, strict=False, max_doc_bytes=10_000_000, mixture=None):
    report = StepReport("read", strict=strict)
    records = mixed_records(sources, mixture or MixtureConfig(), shard_index, num_shards, max_doc_bytes)
    return list(account(records, report, sources)), report


def strict_error(sources) -> str:
    """The one-line error reading `sources` under --strict stops with."""
    with pytest.raises(DataError) as err:
        read(sources, strict=True)
    message = str(err.value)
    assert "\n" not in message
    return message


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_every_local_format_is_read(tmp_path):
    rows = [{"text": f"document number {i}", "meta": i} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": "gzipped"}) + "\n").encode()))
    # Two zstd frames, as `cat a.zst b.zst` or a parallel compressor writes them: both are read.
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zstd"}\n')
                                           + zstandard.ZstdCompressor().compress(b'{"text": "frame two"}\n'))
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), tmp_path / "d.parquet")
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (tree / "notes.txt").write_text("plain text file")
    (tree / "image.png").write_bytes(b"\x89PNG not listed in extensions")
    source = SourceConfig(name="local", paths=[str(tmp_path / "*.jsonl*"), str(tmp_path / "d.parquet"), str(tree)])
    docs, report = read([source])
    texts = [d["text"] for d in docs]
    assert texts[:5] == [r["text"] for r in rows]
    assert set(texts[5:]) == {"gzipped", "zstd", "frame two", "parquet one", "parquet two", "def f():\n    return 1\n",
                              "plain text file"}
    assert docs[0]["id"] == f"{tmp_path / 'a.jsonl'}:1" and docs[0]["source"] == "local"
    assert report.docs_out == len(docs) == 12
    # A file the extensions do not select is passed over, and counted as such.
    assert report.removed == Counter(other_extension=1)
    assert report.examples["other_extension"] == [str(tree / "image.png")]
    assert report.docs_in == 13


def test_bad_records_are_counted_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "fine one"}',
        b'{"text": "truncated',                      # 2 malformed JSON
        b'{"body": "no text field"}',                 # 3 missing field
        b'{"text": "caf\xe9 in latin-1"}',            # 4 not UTF-8
        b'{"text": "   \\n  "}',                      # 5 empty after strip
        b'{"text": 42}',                              # 6 wrong type
        b'',                                          # blank separator line: not a record
        b'{"text": "fine two"}',                      # 8
    ]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    (tree / "ok.txt").write_text("readable")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    docs, report = read([SourceConfig(name="s", paths=[str(bad), str(tree), str(empty)])])
    assert [d["text"] for d in docs] == ["fine one", "fine two", "readable"]
    assert report.removed == Counter(malformed_json=1, missing_text_field=1, non_utf8=1, empty_document=1,
                                     text_field_not_string=1, binary_file=1, empty_file=1)
    assert report.examples["malformed_json"] == [f"{bad}:2"]
    assert report.examples["non_utf8"] == [f"{bad}:4"]
    assert report.examples["empty_document"] == [f"{bad}:5"]
    assert report.examples["binary_file"] == [f"{tree / 'blob.txt'}:1"]
    assert report.examples["empty_file"] == [str(empty)]
    # Every record read is kept or removed: 8 records (the blank line is not one) + 2 files in tree + 1 empty file.
    assert report.docs_in == 10 == report.docs_out + sum(report.removed.values())
    by_reason = {f"removed/{k}": v for k, v in report.removed.items()}
    assert report.by_source["s"] == Counter({"in": 10, "out": 3, **by_reason})


@pytest.mark.parametrize("line,where,reason", [(2, 2, "malformed_json"), (3, 3, "missing_text_field"),
                                               (4, 4, "non_utf8")])
def test_strict_mode_stops_with_one_line_naming_file_and_line(tmp_path, line, where, reason):
    rows = [b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "ok"}', b'{"text": "ok"}']
    rows[line - 1] = {2: b'{"text": ', 3: b'{"title": "x"}', 4: b'{"text": "\xff\xfe"}'}[line]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    assert strict_error([SourceConfig(name="s", paths=[str(path)])]) == f"{path}:{where}: {reason}"


def test_a_100mb_single_line_document_is_skipped_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(b'{"text": "before"}\n{"text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(100):
            handle.write(chunk)
        handle.write(b'"}\n{"text": "after"}\n')
    docs, report = read([SourceConfig(name="s", paths=[str(path)])], max_doc_bytes=10_000_000)
    assert [d["text"] for d in docs] == ["before", "after"]
    assert report.removed == Counter(oversized_document=1)
    assert report.examples["oversized_document"] == [f"{path}:2"]
    assert report.bytes_in > 100 * (1 << 20)  # the skipped bytes are still accounted for


def test_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        read([SourceConfig(name="s", paths=[str(tmp_path / "nope" / "*.jsonl")])])


@pytest.mark.parametrize("num_files", [1, 7])
def test_shards_are_disjoint_and_cover_every_record(tmp_path, num_files):
    paths = []
    for f in range(num_files):
        path = tmp_path / f"part{f}.jsonl"
        write_jsonl(path, [{"text": f"file {f} row {i}"} for i in range(13)])
        paths.append(str(path))
    source = SourceConfig(name="s", paths=paths)
    everything = [d["text"] for d in read([source])[0]]
    shards = [[d["text"] for d in read([source], k, 3)[0]] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(everything) and len(everything) == 13 * num_files
    assert all(shards)


def test_max_docs_caps_a_source_and_is_reported(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": f"row {i}"} for i in range(50)])
    docs, report = read([SourceConfig(name="capped", paths=[str(path)], max_docs=10)])
    assert len(docs) == 10
    assert report.extra["not_read_to_end/capped"] == 1
    docs, report = read([SourceConfig(name="whole", paths=[str(path)])])
    assert len(docs) == 50 and "not_read_to_end/whole" not in report.extra


def test_mixture_follows_the_weights(tmp_path):
    for name in ("web", "code"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(4000)])
    sources = [SourceConfig(name="web", paths=[str(tmp_path / "web.jsonl")], weight=3.0),
               SourceConfig(name="code", paths=[str(tmp_path / "code.jsonl")], weight=1.0)]
    docs, report = read(sources)
    counts = Counter(d["source"] for d in docs)
    # first_exhausted stops when "web" (drawn 75% of the time) runs out of its 4000 documents.
    assert counts["web"] == 4000
    assert abs(counts["code"] / sum(counts.values()) - 0.25) < 0.02
    assert report.extra["not_read_to_end/code"] == 1 and "not_read_to_end/web" not in report.extra
    assert report.extra["docs_from/code"] == counts["code"]


def test_curriculum_stages_come_in_order(tmp_path):
    for name in ("late", "early"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(20)])
    sources = [SourceConfig(name="late", paths=[str(tmp_path / "late.jsonl")], stage=1),
               SourceConfig(name="early", paths=[str(tmp_path / "early.jsonl")], stage=0)]
    docs, _ = read(sources)
    assert [d["source"] for d in docs] == ["early"] * 20 + ["late"] * 20
    assert [d["stage"] for d in docs] == [0] * 20 + [1] * 20


def test_local_dataset_folder_streams_through_datasets(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pq.write_table(pa.table({"content": [f"row {i}" for i in range(10)]}), folder / "train-00000.parquet")
    source = SourceConfig(name="hub", type="hub", path=str(folder), text_field="content")
    docs, report = read([source])
    assert [d["text"] for d in docs] == [f"row {i}" for i in range(10)]
    assert docs[3]["id"] == f"{folder}:3"
    bad = SourceConfig(name="hub", type="hub", path=str(folder), text_field="text")
    docs, report = read([bad])
    assert docs == [] and report.removed == Counter(missing_text_field=10)


def test_embedded_stdlib_corpus_loads_offline():
    files, topics = stdlib_files()
    assert len(files) > 500 and len(topics) > 20
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    source = SourceConfig(name="stdlib", type="stdlib")
    first = list(source_records(source, shard_index=0, num_shards=40))
    kinds = Counter(r["kind"] for r in first if r["skip"] == "")
    assert kinds["code"] > 10 and kinds["text"] >= 1
    assert first[-1]["skip"] == "end_of_source"


def test_skipped_paths_are_counted_with_their_reason(tmp_path):
    tree = tmp_path / "tree"
    (tree / "empty").mkdir(parents=True)
    (tree / "images").mkdir()
    (tree / "images" / "a.png").write_bytes(b"\x89PNG")
    (tree / "doc.txt").write_text("a readable document")
    (tree / "gone.txt").symlink_to(tmp_path / "nowhere.txt")       # dangling
    (tree / "self.txt").symlink_to(tree / "self.txt")              # loops on itself
    (tree / "back").symlink_to(tree)                                # a directory link to an ancestor
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "other.txt").write_text("reached through a link")
    (tree / "link_to_dir").symlink_to(tmp_path / "linked")         # followed
    docs, report = read([SourceConfig(name="s", paths=[str(tree)])])
    assert sorted(d["text"] for d in docs) == ["a readable document", "reached through a link"]
    assert report.removed == Counter(dangling_symlink=1, symlink_loop=2, empty_directory=1, no_matching_files=1)
    assert report.examples["dangling_symlink"] == [str(tree / "gone.txt")]
    assert sorted(report.examples["symlink_loop"]) == [str(tree / "back"), str(tree / "self.txt")]
    assert report.examples["empty_directory"] == [str(tree / "empty")]
    assert report.examples["no_matching_files"] == [str(tree / "images")]
    assert report.docs_in == report.docs_out + sum(report.removed.values()) == 7
    # Counted once over all shards, not once per shard.
    shards = [read([SourceConfig(name="s", paths=[str(tree)])], k, 2)[1] for k in range(2)]
    assert sum((r.removed for r in shards), Counter()) == report.removed
    # Broken paths stop a strict run; directories passed over do not.
    with pytest.raises(DataError) as err:
        read([SourceConfig(name="s", paths=[str(tree)])], strict=True)
    assert str(err.value) == f"{tree / 'back'}: symlink_loop"  # the first broken path in sorted order
    ok = tmp_path / "ok"
    (ok / "empty").mkdir(parents=True)
    (ok / "x.txt").write_text("fine")
    assert [d["text"] for d in read([SourceConfig(name="s", paths=[str(ok)])], strict=True)[0]] == ["fine"]


def test_a_source_with_no_file_is_a_config_error_that_says_why(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        read([SourceConfig(name="s", paths=[str(tmp_path / "empty")])])
    assert str(err.value) == f"sources.s.paths: no file to read (empty_directory 1; e.g. {tmp_path / 'empty'})"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"png")
    with pytest.raises(ConfigError, match="no_matching_files 1"):
        read([SourceConfig(name="s", paths=[str(tmp_path / "pics")])])
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="dangling_symlink 1"):
        read([SourceConfig(name="s", paths=[str(tmp_path / "dangling.jsonl")])])


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    bom = "\ufeff".encode()
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(bom + b"plain text")
    docs, report = read([SourceConfig(name="s", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")])])
    assert [d["text"] for d in docs] == ["first", "second", "plain text"]
    assert not report.removed


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_file_keeps_its_records_and_says_where_it_broke(tmp_path, suffix):
    rng = random.Random(0)  # text that does not compress to nothing: zstd blocks are up to 128 KB
    rows = [{"text": " ".join("".join(rng.choices("abcdefgh", k=6)) for _ in range(150))} for i in range(400)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    packed = gzip.compress(data) if suffix == ".jsonl.gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    docs, report = read([SourceConfig(name="s", paths=[str(path)])])
    good = len(docs) + report.removed["malformed_json"]  # the last line may be cut in the middle
    assert 0 < len(docs) < 400 and [d["text"] for d in docs] == [r["text"] for r in rows[: len(docs)]]
    unreadable = [k for k in report.removed if k.startswith("unreadable_file")]
    assert len(unreadable) == 1 and report.removed[unreadable[0]] == 1
    assert report.examples[unreadable[0]] == [f"{path}:{good + 1}"]
    with pytest.raises(DataError) as err:
        read([SourceConfig(name="s", paths=[str(path)])], strict=True, max_doc_bytes=10_000_000)
    assert str(err.value).startswith(f"{path}:")


# ---------------------------------------------------------------------------------------------
# Tar archives: read member by member, without extraction
# ---------------------------------------------------------------------------------------------

ARCHIVE_FORMATS = [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"]


def tar_bytes(entries):
    """An uncompressed tar of (name, bytes | "dir" | ("symlink", target) | ("hardlink", target) | "fifo")."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content == "dir":
                info.type = tarfile.DIRTYPE
            elif content == "fifo":
                info.type = tarfile.FIFOTYPE
            elif isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = content[1]
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
                continue
            tar.addfile(info)
    return buffer.getvalue()


def write_archive(path, entries):
    import bz2
    import lzma

    data = tar_bytes(entries)
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        data = gzip.compress(data)
    elif name.endswith(".tar.bz2"):
        data = bz2.compress(data, compresslevel=1)  # 100 kB blocks: a cut archive still has whole ones
    elif name.endswith(".tar.xz"):
        data = lzma.compress(data)
    elif name.endswith(".tar.zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


KERNEL_LIKE = [
    ("linux/", "dir"),
    ("linux/fs/inode.c", b"int inode(void)\n{\n\treturn 0;\n}\n"),
    ("linux/fs/inode.h", b"#define INODE 1\n"),
    ("linux/Documentation/fs.rst", b"Filesystems\n===========\n\nHow inodes work.\n"),
    ("linux/Makefile", b"all:\n\techo\n"),
    ("linux/fs/blob.c", b"\x00\x01binary" * 10),
    ("linux/fs/latin1.c", b"/* ok */\n/* caf\xe9 */\n"),
    ("linux/fs/empty.c", b""),
    ("linux/fs/big.c", b"x" * 5000),
    ("linux/fs/link.c", ("symlink", "inode.c")),
    ("linux/fs/hard.c", ("hardlink", "linux/fs/inode.c")),
    ("linux/fs/pipe.c", "fifo"),
]


@pytest.mark.parametrize("suffix", ARCHIVE_FORMATS)
def test_every_tar_format_is_read_member_by_member_with_bad_members_counted(tmp_path, suffix):
    archive = write_archive(tmp_path / f"linux{suffix}", KERNEL_LIKE)
    source = SourceConfig(name="kernel", paths=[str(archive)], extensions=[".c", ".h", ".rst"], kind="code")
    docs, report = read([source], max_doc_bytes=4096)
    assert [(d["id"], d["text"]) for d in docs] == [
        (f"{archive}:linux/fs/inode.c", "int inode(void)\n{\n\treturn 0;\n}\n"),
        (f"{archive}:linux/fs/inode.h", "#define INODE 1\n"),
        (f"{archive}:linux/Documentation/fs.rst", "Filesystems\n===========\n\nHow inodes work.\n"),
    ]
    assert all(d["kind"] == "code" and d["source"] == "kernel" for d in docs)
    assert report.removed == Counter(other_extension=1, binary_file=1, non_utf8=1, empty_file=1,
                                     oversized_document=1, link_member=2, special_member=1)
    assert report.examples["non_utf8"] == [f"{archive}:linux/fs/latin1.c:2"]
    assert report.examples["other_extension"] == [f"{archive}:linux/Makefile"]
    assert report.examples["link_member"] == [f"{archive}:linux/fs/link.c", f"{archive}:linux/fs/hard.c"]
    # Every member but the directory is a record: kept + removed.
    assert report.docs_in == len(KERNEL_LIKE) - 1 == report.docs_out + sum(report.removed.values())
    assert report.bytes_in >= 5000  # the oversized member's bytes are accounted for without being read


def test_member_globs_select_members_and_the_rest_are_passed_over_not_fatal(tmp_path):
    archive = write_archive(tmp_path / "linux.tar.gz", KERNEL_LIKE)
    source = SourceConfig(name="docs", paths=[str(archive)], extensions=[".rst", ".c"],
                          members=["*/Documentation/*"])
    docs, report = read([source], strict=True)  # passing over members is not bad input
    assert [d["id"] for d in docs] == [f"{archive}:linux/Documentation/fs.rst"]
    # The globs first: every regular member outside Documentation/ (5 .c, the .h, the Makefile), the links and the fifo.
    assert report.removed == Counter(unselected_member=7, link_member=2, special_member=1)


@pytest.mark.parametrize("suffix", ARCHIVE_FORMATS)
def test_a_truncated_archive_keeps_its_members_and_names_the_member_it_broke_in(tmp_path, suffix):
    rng = random.Random(0)  # members that do not compress to nothing: bzip2 and zstd blocks are 100-128 kB
    entries = [(f"corpus/doc{i:03d}.txt", " ".join("".join(rng.choices("abcdefgh", k=6)) for _ in range(2000)).encode())
               for i in range(60)]
    whole = write_archive(tmp_path / f"whole{suffix}", entries)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    docs, report = read([SourceConfig(name="s", paths=[str(cut)])])
    assert 0 < len(docs) < 60
    assert [d["text"] for d in docs] == [text.decode() for _, text in entries[: len(docs)]]
    broken = [reason for reason in report.removed if "archive" in reason]
    assert broken == ["truncated_archive"] and report.removed["truncated_archive"] == 1
    (where,) = report.examples["truncated_archive"]
    assert where in (f"{cut}:corpus/doc{len(docs):03d}.txt", f"{cut} (after the last complete member)")
    assert strict_error([SourceConfig(name="s", paths=[str(cut)])]) == f"{where}: truncated_archive"


def test_a_file_that_is_not_an_archive_is_one_entry_not_a_crash(tmp_path):
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"this is not gzip data at all")
    docs, report = read([SourceConfig(name="s", paths=[str(fake)])])
    assert docs == [] and report.removed == Counter({"unreadable_archive (ReadError)": 1})


def test_shards_of_one_archive_are_disjoint_and_cover_every_member(tmp_path):
    entries = [(f"d/{i}.txt", f"member {i}".encode()) for i in range(20)]
    archive = write_archive(tmp_path / "a.tar.xz", entries)
    source = SourceConfig(name="s", paths=[str(archive)])
    shards = [[d["text"] for d in read([source], k, 3)[0]] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(f"member {i}" for i in range(20)) and all(shards)


def test_member_names_that_are_not_utf8_become_escapes(tmp_path):
    import tarfile

    tar = tmp_path / "names.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as out:
        info = tarfile.TarInfo("caf\xe9.txt")
        info.size = 5
        import io
        out.addfile(info, io.BytesIO(b"hello"))
    docs, _ = read([SourceConfig(name="s", paths=[str(tar)])])
    assert [d["id"] for d in docs] == [f"{tar}:caf\\xe9.txt"] and docs[0]["text"] == "hello"


def test_kind_auto_makes_code_files_code_and_the_rest_text_in_folders_and_archives(tmp_path):
    tree = tmp_path / "repo"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (tree / "src" / "entry.S").write_text("mov %eax, %ebx\n")  # upper-case extensions match without case
    (tree / "README.md").write_text("# A project\n")
    (tree / "notes.txt").write_text("some notes\n")
    archive = write_archive(tmp_path / "repo.tar.gz", [("repo/x.py", b"x = 1\n"), ("repo/doc.rst", b"Title\n")])
    source = SourceConfig(name="s", paths=[str(tree), str(archive)], kind="auto",
                          extensions=[".c", ".S", ".md", ".txt", ".py", ".rst"])
    docs, report = read([source])
    kinds = {d["id"].rsplit("/", 1)[-1].removesuffix(":1"): d["kind"] for d in docs}
    assert kinds == {"README.md": "text", "notes.txt": "text", "main.c": "code", "entry.S": "code", "x.py": "code",
                     "doc.rst": "text"}
    assert not report.removed


def test_kind_auto_needs_a_local_source():
    from data_prep.config import load_config

    with pytest.raises(ConfigError, match=r"^sources\.0\.kind: auto picks the kind from file names"):
        load_config(raw={"output_dir": "out", "sources": [{"name": "h", "type": "hub", "path": "x", "kind": "auto"}]})
