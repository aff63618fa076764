"""evaluation.baselines: compressors' bits per byte, each document compressed on its own, over UTF-8 bytes."""

import bz2
import gzip
import inspect
import json
import lzma
import random
import shutil
import subprocess

import brotli
import pytest
import zstandard
from conftest import debian_program

from evaluation.baselines import compressor_bits_per_byte, zpaq_m5

IN_PROCESS = ["gzip -9", "zstd -19", "xz -9e", "bzip2 -9", "brotli -q 11"]


def test_each_document_is_compressed_on_its_own_at_the_strongest_settings():
    texts = ["def f(x):\n    return x + 1\n" * 40, "", "naïve café " * 30, "not scored"]
    result = compressor_bits_per_byte(iter(texts), max_documents=3)
    scored = [text.encode() for text in texts[:3]]
    total = sum(map(len, scored))
    expected = {
        "gzip -9": sum(len(gzip.compress(d, compresslevel=9, mtime=0)) for d in scored if d),
        "zstd -19": sum(len(zstandard.ZstdCompressor(level=19).compress(d)) for d in scored if d),
        "xz -9e": sum(len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in scored if d),
        "bzip2 -9": sum(len(bz2.compress(d, compresslevel=9)) for d in scored if d),
        "brotli -q 11": sum(len(brotli.compress(d, quality=11, lgwin=24)) for d in scored if d),
    }
    assert list(result) == [*expected, "zpaq -m5"]
    for name, compressed in expected.items():
        assert result[name] == {"bits_per_byte": 8 * compressed / total, "compressed_bytes": compressed,
                                "bytes": total, "documents": 3}
    # Repetitive text compresses far below 8 bits per byte; one document holding both texts would do better still,
    # which is why each document is compressed on its own, as a model scores each on its own. (Not zpaq here: its
    # archive's ~1 KB of overhead per document outweighs these few hundred bytes; see the zpaq tests.)
    assert all(result[name]["bits_per_byte"] < 2.0 for name in expected)
    together = compressor_bits_per_byte(["".join(texts[:3])])
    assert together["xz -9e"]["compressed_bytes"] < result["xz -9e"]["compressed_bytes"]
    assert compressor_bits_per_byte([])["gzip -9"]["bits_per_byte"] is None


def test_brotli_reaches_repeats_beyond_gzips_window():
    # A 40 KB block of code-like words, twice: the second copy lies beyond DEFLATE's 32 KB window, so gzip pays
    # for it again, while brotli's 16 MiB window (lgwin 24) codes it as one long match.
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "None", "(", ")", ":",
             "\n    ", "data", "len", "range"]
    block = " ".join(rng.choice(words) for _ in range(9000))
    assert len(block.encode()) > 32 * 1024
    once, twice = compressor_bits_per_byte([block]), compressor_bits_per_byte([block * 2])
    assert twice["gzip -9"]["bits_per_byte"] > 0.9 * once["gzip -9"]["bits_per_byte"]
    assert twice["brotli -q 11"]["bits_per_byte"] < 0.6 * once["brotli -q 11"]["bits_per_byte"]
    assert twice["brotli -q 11"]["bits_per_byte"] < 0.6 * twice["gzip -9"]["bits_per_byte"]


@pytest.fixture
def zpaq() -> str:
    return debian_program("zpaq", "zpaq-deps", "measure zpaq -m5")


def test_zpaq_m5_counts_a_real_one_file_archive(zpaq, tmp_path):
    source = inspect.getsource(json.decoder)  # real Python source, ~12 KB
    archive = zpaq_m5(source.encode())
    (tmp_path / "a.zpaq").write_bytes(archive)
    subprocess.run([zpaq, "x", "a.zpaq"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "d").read_bytes() == source.encode()  # the archive holds the document, nothing else
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.zpaq", "d"]
    # The whole archive is counted: a 1-byte document costs about 1 KB (model description, journal, index).
    assert 900 < len(zpaq_m5(b"x")) < 1200


def test_zpaq_m5_is_measured_when_installed(zpaq):
    import argparse

    source = inspect.getsource(argparse)  # ~100 KB of Python: enough text for its ~1 KB overhead not to matter
    result = compressor_bits_per_byte([source, source[:5000]])
    zpaq_result = result["zpaq -m5"]
    assert zpaq_result["compressed_bytes"] == len(zpaq_m5(source.encode())) + len(zpaq_m5(source[:5000].encode()))
    assert zpaq_result["bits_per_byte"] == 8 * zpaq_result["compressed_bytes"] / zpaq_result["bytes"]
    assert zpaq_result["documents"] == 2 and "not_measured" not in zpaq_result
    assert 0.8 < zpaq_result["bits_per_byte"] < 2.0
    # Context mixing at -m5 beats every dictionary and block-sorting compressor here, overhead and all.
    assert zpaq_result["bits_per_byte"] < min(result[name]["bits_per_byte"] for name in IN_PROCESS)


def test_zpaq_not_installed_is_marked_not_measured(monkeypatch, tmp_path):
    from reporting.quickstart_report import write_quickstart_report

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no zpaq on PATH
    assert shutil.which("zpaq") is None
    texts = ["def f(x):\n    return x + 1\n" * 40, "naïve café " * 30]
    result = compressor_bits_per_byte(texts)
    total = sum(len(text.encode()) for text in texts)
    assert result["zpaq -m5"] == {"bits_per_byte": None, "compressed_bytes": None, "bytes": total, "documents": 2,
                                  "not_measured": "zpaq not installed"}
    assert all(result[name]["bits_per_byte"] < 2.0 for name in IN_PROCESS)  # the others are measured as ever

    out = tmp_path / "out"
    out.mkdir()
    report = write_quickstart_report(out, {"perplexity": {"seconds": 1.0, "compressors": result}},
                                     pretrain_dir=out / "pretrain", wall_seconds=1.0).read_text()
    assert "| zpaq -m5 (each document compressed on its own) | not measured (zpaq not installed) |" in report
    brotli_bpb = result["brotli -q 11"]["bits_per_byte"]
    assert f"| brotli -q 11 (each document compressed on its own) | {brotli_bpb:.3f} |" in report
    assert "zpaq's is a one-file archive" not in report  # the overhead note only beside a zpaq number
    headline = json.loads((out / "results.json").read_text())["headline"]["held_out_bpb_compressors"]
    assert headline == {**{name: result[name]["bits_per_byte"] for name in IN_PROCESS}, "zpaq -m5": None}
