"""Tests of `data_prep.tokenizer`: training, exact round trips, special-token safety, saving and loading."""

import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from data_prep.config import ConfigError, TokenizerConfig
from data_prep.fast_bpe import CHECK_SET
from data_prep.tokenizer import (
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    IM_END,
    IM_START,
    SavedTokenizer,
    compression_stats,
    copy_tokenizer,
    encode_documents,
    load_tokenizer,
    special_tokens_for,
    tokenizer_fingerprint,
    train_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])

HARD_STRINGS = [
    "",
    " ",
    "hello world",
    "  two leading spaces and trailing   ",
    "tabs\tand\t\tmixed \t indentation\n\t    x = 1\n",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\n",
    "control \x00\x01\x07\x1b[31mred\x1b[0m \x7f",
    "family 👨\u200d👩\u200d👧\u200d👦 flag 🇺🇸 skin 👍🏽",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zero\u200bwidth",
    "RTL \u202eabc\u202c עברית العربية \u200f",
    "CJK 日本語の文章。中文，한국어",
    "nbsp\u00a0line sep\u2028para sep\u2029bom\ufeff",
    "supplementary 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎 \U000e0041 \U0010fffd",
    "markers Ġ Ċ ▁ <0x41> ## literal",
    "numbers 1234567890 3.14159 -0x1F",
]


def random_unicode(rng: random.Random, length: int) -> str:
    """Code points from every plane (no surrogates), mixed with whitespace and ASCII."""
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x300, 0x36F), (0x590, 0x6FF), (0x2000, 0x206F),
              (0x4E00, 0x9FFF), (0xE000, 0xFFFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.2:
            chars.append(rng.choice(" \t\n\r  "))
        else:
            low, high = rng.choice(ranges)
            code = rng.randint(low, high)
            chars.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "?")
    return "".join(chars)


def stdlib_texts(max_bytes: int, held_out: bool = False) -> list[str]:
    """Stdlib sources in a fixed order; every tenth file (under 60 kB, so there are many) is held out."""
    files = sorted(STDLIB.glob("*.py"))
    texts, total = [], 0
    for i, path in enumerate(files):
        if held_out != (i % 10 == 0) or held_out and path.stat().st_size > 60_000:
            continue
        text = path.read_text(encoding="utf-8")
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """An 8k byte-level BPE trained on ~2 MB of stdlib sources."""
    out = tmp_path_factory.mktemp("bpe") / "tokenizer"
    train_tokenizer(stdlib_texts(2_000_000), TokenizerConfig(vocab_size=8192), out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> PreTrainedTokenizerFast:
    return load_tokenizer(bpe_dir)


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unigram") / "tokenizer"
    train_tokenizer(stdlib_texts(150_000), TokenizerConfig(model="unigram", vocab_size=1024), out)
    return out


@pytest.fixture(scope="module")
def unigram(unigram_dir) -> PreTrainedTokenizerFast:
    return load_tokenizer(unigram_dir)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def test_bpe_round_trip_is_exact_for_hard_strings_and_random_unicode(bpe):
    rng = random.Random(0)
    texts = HARD_STRINGS + [random_unicode(rng, rng.randint(0, 80)) for _ in range(300)]
    for text, ids in zip(texts, encode_documents(bpe, texts)):
        assert bpe.decode(ids) == text
    # Every byte is in the alphabet: nothing in any of these texts is unknown.
    assert bpe.unk_token is None


def test_bpe_round_trip_is_exact_for_held_out_python_sources(bpe):
    texts = stdlib_texts(300_000, held_out=True)
    for text, ids in zip(texts, encode_documents(bpe, texts)):
        assert bpe.decode(ids) == text


def test_unigram_with_byte_fallback_round_trips_except_the_documented_cases(unigram):
    rng = random.Random(1)
    # Lossless when the text does not start with a space and has no literal "▁".
    texts = [t for t in HARD_STRINGS if not t.startswith(" ") and "▁" not in t]
    texts += ["x" + random_unicode(rng, rng.randint(0, 60)).replace("▁", "") for _ in range(200)]
    for text, ids in zip(texts, encode_documents(unigram, texts)):
        assert unigram.decode(ids) == text
    # Unseen characters become byte pieces, never <|unk|>.
    ids = encode_documents(unigram, ["emoji 🦜 and 𠜎"])[0]
    assert unigram.unk_token_id not in ids
    assert "<0xF0>" in unigram.convert_ids_to_tokens(ids)
    # The two documented losses.
    assert unigram.decode(encode_documents(unigram, [" lead"])[0]) == "lead"
    assert unigram.decode(encode_documents(unigram, ["a▁b"])[0]) == "a b"


def test_wordpiece_trains_loads_and_encodes_but_is_lossy(tmp_path):
    out = tmp_path / "wp"
    train_tokenizer(stdlib_texts(100_000), TokenizerConfig(model="wordpiece", vocab_size=600), out)
    tokenizer = load_tokenizer(out)
    ids = encode_documents(tokenizer, ["def f(x):\n    return x"])[0]
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) != "def f(x):\n    return x"  # whitespace is not kept
    assert tokenizer.unk_token_id in encode_documents(tokenizer, ["🦜"])[0]


# ---------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------

def special_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens the vocabulary has, by role."""
    tokens = {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "im_start": IM_START, "im_end": IM_END,
              "fim_prefix": FIM_PREFIX, "fim_middle": FIM_MIDDLE, "fim_suffix": FIM_SUFFIX}
    vocab = tokenizer.get_vocab()
    return {role: vocab[token] for role, token in tokens.items() if token in vocab}


def test_special_tokens_have_fixed_ids_at_the_start_of_the_vocab(bpe):
    ids = special_ids(bpe)
    assert ids == {"eos": 0, "pad": 1, "im_start": 2, "im_end": 3, "fim_prefix": 4, "fim_middle": 5, "fim_suffix": 6}
    assert bpe.convert_ids_to_tokens(list(range(7, 15))) == [f"<|reserved_{i}|>" for i in range(8)]
    assert bpe.bos_token == bpe.eos_token == "<|endoftext|>"
    assert bpe.pad_token == "<|pad|>"


def test_without_fim_tokens_the_reserved_slots_move_up(tmp_path):
    cfg = TokenizerConfig(vocab_size=300, fim_tokens=False, num_reserved_tokens=2)
    assert special_tokens_for(cfg) == ["<|endoftext|>", "<|pad|>", IM_START, IM_END, "<|reserved_0|>", "<|reserved_1|>"]
    tokenizer = train_tokenizer(stdlib_texts(20_000), cfg, tmp_path / "tok")
    assert special_ids(tokenizer) == {"eos": 0, "pad": 1, "im_start": 2, "im_end": 3}
    assert tokenizer.convert_ids_to_tokens([4, 5]) == ["<|reserved_0|>", "<|reserved_1|>"]


def test_special_token_text_inside_documents_is_encoded_as_text(bpe):
    texts = ["before <|endoftext|> after", "<|pad|><|im_start|>user<|fim_prefix|><|reserved_3|>"]
    special_ids = set(bpe.all_special_ids)
    assert len(special_ids) == 15
    encoded = encode_documents(bpe, texts)
    for text, ids in zip(texts, encoded):
        assert not special_ids & set(ids)
        assert bpe.decode(ids) == text
    # The plain call (run after encode_documents, so the backend setting was restored) matches the
    # special token; this is why the packer uses encode_documents.
    assert bpe.eos_token_id in bpe(texts[0])["input_ids"]
    assert bpe(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] == encoded


def test_call_adds_no_bos_or_eos(bpe):
    ids = bpe("x = 1\n")["input_ids"]
    assert ids == encode_documents(bpe, ["x = 1\n"])[0]
    assert bpe.eos_token_id not in ids and bpe.pad_token_id not in ids


def test_encode_documents_ignores_truncation_left_on_by_an_earlier_call(bpe):
    text = "word " * 50
    assert len(bpe(text, truncation=True, max_length=4)["input_ids"]) == 4
    assert len(encode_documents(bpe, [text])[0]) > 40


def test_encode_documents_replaces_lone_surrogates_and_rejects_non_strings(bpe):
    ids = encode_documents(bpe, ["ok", "a\ud800b"])
    assert bpe.decode(ids[1]) == "a\ufffdb"
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        encode_documents(bpe, ["ok", b"bytes"])


# ---------------------------------------------------------------------------------------------
# Saving, loading, fingerprint
# ---------------------------------------------------------------------------------------------

def test_loads_offline_in_a_fresh_process(bpe_dir, bpe, tmp_path):
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer, PreTrainedTokenizerFast\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({'fast': isinstance(t, PreTrainedTokenizerFast), 'eos': t.eos_token, 'bos': t.bos_token,\n"
        "                  'pad': t.pad_token, 'max_len': t.model_max_length, 'ids': t('def f():\\n')['input_ids'],\n"
        "                  'chat': t.chat_template is not None}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script, str(bpe_dir)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"fast": True, "eos": "<|endoftext|>", "bos": "<|endoftext|>", "pad": "<|pad|>",
                      "max_len": 2048, "ids": encode_documents(bpe, ["def f():\n"])[0], "chat": True}


def test_load_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot load tokenizer") as err:
        load_tokenizer(broken)
    assert "\n" not in str(err.value) and str(broken) in str(err.value)


def test_fingerprint_is_stable_and_tracks_the_vocabulary(bpe_dir, bpe, tmp_path):
    fingerprint = tokenizer_fingerprint(bpe_dir)
    assert len(fingerprint) == 64
    assert tokenizer_fingerprint(bpe) == fingerprint
    assert tokenizer_fingerprint(bpe.backend_tokenizer) == fingerprint
    other = train_tokenizer(stdlib_texts(50_000), TokenizerConfig(vocab_size=512), tmp_path / "small")
    assert tokenizer_fingerprint(other) != fingerprint
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        tokenizer_fingerprint(tmp_path)


def test_training_is_deterministic(tmp_path):
    texts = stdlib_texts(300_000)
    cfg = TokenizerConfig(vocab_size=1024)
    first = train_tokenizer(texts, cfg, tmp_path / "a")
    second = train_tokenizer(texts, cfg, tmp_path / "b")
    assert tokenizer_fingerprint(tmp_path / "a") == tokenizer_fingerprint(tmp_path / "b")
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(tmp_path / "a")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first.get_vocab() == second.get_vocab()
    changed = train_tokenizer(texts, TokenizerConfig(vocab_size=1024, min_frequency=50), tmp_path / "c")
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(first)


def test_save_replaces_the_directory_atomically(tmp_path, monkeypatch):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    texts = stdlib_texts(20_000)
    train_tokenizer(texts, TokenizerConfig(vocab_size=300), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    before = (out / "tokenizer.json").read_bytes()

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer(texts, TokenizerConfig(vocab_size=400), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert (out / "tokenizer.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Training input and config
# ---------------------------------------------------------------------------------------------

def test_training_reads_at_most_train_bytes(tmp_path, caplog):
    texts = ["abc " * 200, "zzzz " * 400]  # 800 bytes, then text never seen within the budget
    limited = train_tokenizer(texts, TokenizerConfig(vocab_size=300, train_bytes=800), tmp_path / "a")
    full = train_tokenizer(texts, TokenizerConfig(vocab_size=300, train_bytes=10_000), tmp_path / "b")
    assert len(encode_documents(limited, ["zzzz"])[0]) == 4
    assert len(encode_documents(full, ["zzzz"])[0]) == 1
    assert len(encode_documents(limited, ["abc"])[0]) == 1
    # A budget ending inside a two-byte character keeps only whole characters.
    with caplog.at_level("INFO", logger="data_prep.tokenizer"):
        train_tokenizer(["é" * 500, "more"], TokenizerConfig(vocab_size=300, train_bytes=301), tmp_path / "c")
    assert "trained on 1 docs / 300 bytes" in caplog.text


def test_bad_config_and_empty_input_fail_with_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size: must be >= 272 for model bpe, got 100"):
        train_tokenizer(["text"], TokenizerConfig(vocab_size=100), tmp_path / "a")
    with pytest.raises(ConfigError, match="tokenizer.eos_token/pad_token: special tokens must be distinct"):
        train_tokenizer(["text"], TokenizerConfig(pad_token="<|endoftext|>"), tmp_path / "b")
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["", ""], TokenizerConfig(vocab_size=300), tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# Chat template and compression
# ---------------------------------------------------------------------------------------------

def test_chat_template_renders_chatml(bpe):
    messages = [{"role": "user", "content": "What is 2+2?\nShow work."}, {"role": "assistant", "content": "4"}]
    rendered = bpe.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|im_start|>user\nWhat is 2+2?\nShow work.<|im_end|>\n"
                        "<|im_start|>assistant\n4<|im_end|>\n")
    prompt = bpe.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == rendered[: rendered.index("<|im_start|>assistant")] + "<|im_start|>assistant\n"
    ids = bpe.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids.count(special_ids(bpe)["im_start"]) == 2 and ids.count(special_ids(bpe)["im_end"]) == 2
    assert bpe.eos_token_id not in ids


def test_compression_on_held_out_stdlib(bpe):
    held_out = stdlib_texts(300_000, held_out=True)
    stats = compression_stats(bpe, held_out)
    assert stats["docs"] == len(held_out)
    assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in held_out)
    assert stats["chars"] == sum(map(len, held_out))
    assert stats["bytes_per_token"] == stats["bytes"] / stats["tokens"]
    assert 2.5 < stats["bytes_per_token"] < 8.0
    unicode_stats = compression_stats(bpe, ["日本語", "é"])
    assert (unicode_stats["bytes"], unicode_stats["chars"], unicode_stats["docs"]) == (11, 4, 2)
    assert compression_stats(bpe, []) == {"docs": 0, "bytes": 0, "chars": 0, "tokens": 0,
                                          "bytes_per_token": 0.0, "chars_per_token": 0.0}


def test_a_loaded_tokenizer_saves_without_loading_options(bpe_dir, tmp_path):
    load_tokenizer(bpe_dir).save_pretrained(tmp_path / "copy")
    saved = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and "is_local" not in saved
    assert saved["eos_token"] == "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Reading a saved tokenizer without transformers; copying a given one
# ---------------------------------------------------------------------------------------------

def test_saved_tokenizer_reads_what_the_transformers_tokenizer_has(bpe_dir, unigram_dir, tmp_path):
    wordpiece = tmp_path / "wp"
    train_tokenizer(stdlib_texts(100_000), TokenizerConfig(model="wordpiece", vocab_size=600), wordpiece)
    texts = HARD_STRINGS + stdlib_texts(50_000, held_out=True) + ["a <|endoftext|> b <|im_start|>"]
    for folder in (bpe_dir, unigram_dir, wordpiece):
        full, light = load_tokenizer(folder), SavedTokenizer(folder)
        assert len(light) == len(full) and light.get_vocab() == full.get_vocab()
        assert light.eos_token_id == full.eos_token_id == 0
        assert tokenizer_fingerprint(light) == tokenizer_fingerprint(full) == tokenizer_fingerprint(folder)
        assert encode_documents(light, texts) == encode_documents(full, texts)
        assert compression_stats(light, texts) == compression_stats(full, texts)


def test_reading_and_copying_a_tokenizer_imports_no_transformers(bpe_dir, tmp_path):
    code = ("import sys; import data_prep.packing, data_prep.pipeline; "  # what the pack workers import
            "from data_prep.tokenizer import SavedTokenizer, copy_tokenizer, encode_documents; "
            f"t = copy_tokenizer({str(bpe_dir)!r}, __import__('pathlib').Path({str(tmp_path / 'copy')!r})); "
            "encode_documents(t, ['x = 1']); print(sorted({'transformers', 'torch'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_copy_tokenizer_copies_the_files_and_replaces_the_folder(bpe_dir, bpe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    copied = copy_tokenizer(bpe_dir, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bpe_dir.iterdir())
    for path in bpe_dir.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert tokenizer_fingerprint(copied) == tokenizer_fingerprint(bpe)
    assert load_tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        bpe.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_copy_tokenizer_makes_a_transformers_5_save_portable_and_drops_loading_options(bpe_dir, tmp_path):
    source = tmp_path / "v5"
    load_tokenizer(bpe_dir).save_pretrained(source)  # transformers 5's own form: TokenizersBackend
    config = json.loads((source / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"
    config["local_files_only"] = True
    (source / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    copy_tokenizer(source, tmp_path / "out")
    copied = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert copied["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in copied
    assert "local_files_only" not in copied
    assert copied["additional_special_tokens"][:2] == [IM_START, IM_END]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_a_given_tokenizer_that_cannot_be_used_is_refused_in_one_line(bpe_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="tokenizer directory not found"):
        copy_tokenizer(tmp_path / "missing", out)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        copy_tokenizer(tmp_path, out)
    cases = {"tokenizer.json": ("{not json", "cannot load tokenizer"),
             "tokenizer_config.json": ("[1, 2]", "tokenizer_config.json: expected a JSON object, got list")}
    for name, (text, message) in cases.items():
        broken = tmp_path / name.replace(".", "_")
        broken.mkdir()
        for path in bpe_dir.iterdir():
            (broken / path.name).write_bytes(path.read_bytes())
        (broken / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message) as err:
            copy_tokenizer(broken, out)
        assert "\n" not in str(err.value) and str(broken) in str(err.value)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match="eos_token: missing or not in the vocabulary"):
        copy_tokenizer(no_eos, out)
    assert not out.exists()  # nothing written for a refused tokenizer


# ---------------------------------------------------------------------------------------------
# The tiktoken encoder: used only where it gives the same ids
# ---------------------------------------------------------------------------------------------

def reference_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    """The ids `tokenizers` gives, through the fallback path of `encode_documents`."""
    slow = SavedTokenizer(folder)
    slow.fast_encode = None
    return encode_documents(slow, texts)


def test_a_trained_bpe_encodes_with_tiktoken_and_gets_the_ids_tokenizers_gives(bpe_dir):
    fast = SavedTokenizer(bpe_dir)
    assert fast.encoder == "tiktoken"
    rng = random.Random(0)
    texts = (HARD_STRINGS + list(CHECK_SET) + stdlib_texts(400_000, held_out=True)
             + [random_unicode(rng, 400) for _ in range(50)]
             + ["lone \ud800 surrogate", "pair \ud83d\ude00 as two code points", "<|endoftext|><|pad|>"])
    assert encode_documents(fast, texts) == reference_ids(bpe_dir, texts)


def test_packed_shards_are_byte_identical_with_either_encoder(bpe_dir, tmp_path):
    from data_prep.config import PackConfig
    from data_prep.packing import pack_documents

    rng = random.Random(1)
    texts = stdlib_texts(300_000, held_out=True) + HARD_STRINGS + [random_unicode(rng, 300) for _ in range(30)]
    docs = [{"text": t, "kind": "code" if i % 2 else "text", "source": "s"} for i, t in enumerate(texts)]
    cfg = PackConfig(seq_len=128, batch_docs=7, fim_rate=0.5)  # FIM pieces are encoded separately
    for name, fast in (("tiktoken", True), ("tokenizers", False)):
        tokenizer = SavedTokenizer(bpe_dir)
        if not fast:
            tokenizer.fast_encode = None
        pack_documents(docs, tokenizer, tmp_path / name / "shard", cfg)
    for suffix in (".bin", ".idx.npy", ".json"):
        a, b = (tmp_path / name / f"shard{suffix}" for name in ("tiktoken", "tokenizers"))
        assert a.read_bytes() == b.read_bytes(), suffix


def byte_level_bpe(extra_vocab: list[str], merges: list[tuple[str, str]], split: str = r"\p{L}+|\s+|[^\s\p{L}]+"):
    """A byte-level BPE built by hand: the 256 byte tokens, then `extra_vocab` in id order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + extra_vocab)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def test_merges_tiktoken_would_apply_another_way_keep_tokenizers(tmp_path):
    from data_prep.fast_bpe import fast_encoder

    # "abc" is made from "ab" + "c", but "bc" merges first: tokenizers then stops at a + bc, while tiktoken would
    # take "abc" whole. The two really differ on "abc"; the merge check sees it without encoding anything.
    backend = byte_level_bpe(["bc", "ab", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")])
    assert backend.encode("abc").tokens == ["a", "bc"]
    encode, why = fast_encoder(backend)
    assert encode is None and "would build" in why
    # The same vocabulary with consistent merges is accepted and matches.
    good = byte_level_bpe(["ab", "bc", "abc"], [("a", "b"), ("b", "c"), ("ab", "c")])
    encode, why = fast_encoder(good)
    assert why == "" and encode("abc abcd bca") == good.encode("abc abcd bca").ids


def test_a_split_tiktoken_runs_differently_is_caught_by_the_check_set_and_logged_once(tmp_path, caplog):
    from data_prep.fast_bpe import fast_encoder

    # Isolated splitting keeps the text between matches as pieces; tiktoken drops it. This regex leaves
    # spaces and punctuation unmatched, so the structure passes and only encoding the check set shows it.
    backend = byte_level_bpe(["ab"], [("a", "b")], split=r"\p{L}+")
    encode, why = fast_encoder(backend)
    assert encode is None and why.startswith("tiktoken's ids differ on the check text")
    folder = tmp_path / "tok"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "ab"}), encoding="utf-8")
    with caplog.at_level("WARNING", logger="data_prep.tokenizer"):
        saved = SavedTokenizer(folder)
    assert saved.encoder == "tokenizers"
    lines = [r.getMessage() for r in caplog.records if r.name == "data_prep.tokenizer"]
    assert len(lines) == 1 and "encoding with tokenizers, not tiktoken: tiktoken's ids differ" in lines[0]
    assert encode_documents(saved, ["ab, ab!"]) == [backend.encode("ab, ab!", add_special_tokens=False).ids]


def test_unigram_and_wordpiece_keep_tokenizers_without_a_warning(unigram_dir, caplog):
    with caplog.at_level("WARNING", logger="data_prep.tokenizer"):
        assert SavedTokenizer(unigram_dir).encoder == "tokenizers"
    assert not caplog.records
