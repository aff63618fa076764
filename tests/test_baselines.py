"""evaluation.baselines: compressors' bits per byte, each document compressed on its own, over UTF-8 bytes."""

import bz2
import gzip
import lzma

import zstandard

from evaluation.baselines import compressor_bits_per_byte


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
    }
    assert list(result) == list(expected)
    for name, compressed in expected.items():
        assert result[name] == {"bits_per_byte": 8 * compressed / total, "compressed_bytes": compressed,
                                "bytes": total, "documents": 3}
    # Repetitive text compresses far below 8 bits per byte; one document holding both texts would do better still,
    # which is why each document is compressed on its own, as a model scores each on its own.
    assert all(r["bits_per_byte"] < 2.0 for r in result.values())
    together = compressor_bits_per_byte(["".join(texts[:3])])
    assert together["xz -9e"]["compressed_bytes"] < result["xz -9e"]["compressed_bytes"]
    assert compressor_bits_per_byte([])["gzip -9"]["bits_per_byte"] is None
