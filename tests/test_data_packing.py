"""Packed token shards: exact stream layout and token accounting, EOS and FIM handling, the map-style
reader across shards and DataLoader workers, and the streaming packer with exact resume."""

import json
import pickle
import random
import shutil
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.utils.data import DataLoader
from transformers.loss.loss_utils import ForCausalLMLoss

from data_prep.config import PackConfig, TokenizerConfig
from data_prep.packing import FimSpec, PackedShardWriter, count_blocks, pack_documents
from data_prep.report import StepReport
from data_prep.token_dataset import PackedDataset, StreamingPackedDataset, document_position_ids
from data_prep.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, tokenizer_fingerprint, train_tokenizer

SEQ_LEN = 16
LITERAL_EOS_TEXT = 'marker = "<|endoftext|>"  # a literal special token inside code'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    return train_tokenizer([text], TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok") / "tokenizer")


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """Stdlib snippets from a few characters to several blocks long; odd positions are code."""
    source = Path(json.decoder.__file__).read_text(encoding="utf-8") + Path(shutil.__file__).read_text(encoding="utf-8")
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([3, 40, 200, 900])
        start = rng.randrange(len(source) - length)
        docs.append({"text": source[start:start + length], "kind": "code" if i % 2 else "text",
                     "source": "b" if i % 3 else "a", "id": f"doc:{i}"})
    if n > 5:
        docs[3]["text"] = LITERAL_EOS_TEXT
        docs[5]["text"] = ""
    return docs


def reference_ids(tokenizer, text: str) -> list[int]:
    # Independent of encode_documents: the tokenizer's own call, told to treat special-token text as text.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def reference_stream(tokenizer, docs: list[dict]) -> np.ndarray:
    return np.array([t for d in docs for t in [*reference_ids(tokenizer, d["text"]), tokenizer.eos_token_id]])


def split_documents(stream: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    return [stream[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends)]


def assert_examples_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for key in x:
            assert torch.equal(x[key], y[key]), (i, key)


@pytest.mark.parametrize(("num_tokens", "expected"), [
    (0, (0, 0)), (1, (0, 1)), (4, (0, 4)), (5, (0, 5)), (6, (1, 0)), (7, (1, 1)), (10, (1, 4)), (11, (2, 0)),
])
def test_count_blocks_counts_the_shared_token_once(num_tokens, expected):
    # seq_len 5: a block is 6 tokens and the next one starts on the last of them.
    assert count_blocks(num_tokens, 5) == expected


def test_pack_conserves_every_token_and_lays_out_blocks_exactly(tmp_path, tokenizer):
    docs = make_docs(40)
    report = StepReport("pack")
    meta = pack_documents(docs, tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN, batch_docs=7), report)

    expected = reference_stream(tokenizer, docs)
    stream = np.fromfile(tmp_path / "s0.bin", dtype=np.uint16)
    assert np.array_equal(stream, expected)
    lengths = [len(reference_ids(tokenizer, d["text"])) + 1 for d in docs]
    assert meta["num_tokens"] == sum(lengths) == len(stream)
    assert meta["num_tokens"] == meta["num_blocks"] * SEQ_LEN + 1 + meta["remainder_tokens"]
    assert meta["num_blocks"] > 50 and 0 <= meta["remainder_tokens"] < SEQ_LEN
    assert np.array_equal(np.load(tmp_path / "s0.idx.npy"), np.cumsum(lengths))
    assert np.load(tmp_path / "s0.idx.npy").dtype == np.uint64
    assert json.loads((tmp_path / "s0.json").read_text()) == meta
    assert meta["num_documents"] == 40 and meta["source_documents"] == {"a": 14, "b": 26}
    assert meta["kind_documents"] == {"code": 20, "text": 20} and meta["fim"] is None
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer) and meta["dtype"] == "uint16"
    assert dict(report.extra) == {"tokens": meta["num_tokens"], "blocks": meta["num_blocks"],
                                  "remainder_tokens": meta["remainder_tokens"], "fim_docs": 0}

    dataset = PackedDataset(tmp_path / "s0")
    assert len(dataset) == meta["num_blocks"]
    for i in range(len(dataset)):
        block = torch.from_numpy(expected[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1])
        assert torch.equal(dataset[i]["input_ids"], block[:-1]) and torch.equal(dataset[i]["shift_labels"], block[1:])
        assert dataset[i]["input_ids"].dtype == torch.long and "position_ids" not in dataset[i]
    # Every token after the first is a target exactly once, up to the uncovered tail.
    targets = torch.cat([dataset[i]["shift_labels"] for i in range(len(dataset))])
    assert torch.equal(targets, torch.from_numpy(expected[1:len(expected) - meta["remainder_tokens"]]))


def test_eos_only_at_document_ends_even_for_literal_special_text(tmp_path, tokenizer):
    eos = tokenizer.eos_token_id
    assert eos in tokenizer(LITERAL_EOS_TEXT, add_special_tokens=False)["input_ids"]  # what a naive call does
    docs = make_docs(12)
    pack_documents(docs, tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN))
    stream = np.fromfile(tmp_path / "s0.bin", dtype=np.uint16)
    ends = np.load(tmp_path / "s0.idx.npy")
    assert np.array_equal(np.flatnonzero(stream == eos), ends - 1)
    pieces = split_documents(stream, ends)
    assert tokenizer.decode(pieces[3][:-1]) == LITERAL_EOS_TEXT
    assert pieces[5] == [eos]  # an empty document is just its EOS


def test_position_ids_restart_after_every_eos(tmp_path, tokenizer):
    assert document_position_ids(np.array([5, 6, 0, 7, 8, 0, 0, 9]), eos_id=0).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert document_position_ids(np.array([0, 4, 4]), eos_id=0).tolist() == [0, 0, 1]
    assert document_position_ids(np.array([3, 4, 4]), eos_id=0).tolist() == [0, 1, 2]

    pack_documents(make_docs(20), tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN))
    dataset = PackedDataset(tmp_path, return_position_ids=True)
    restarts = 0
    for i in range(len(dataset)):
        ids, positions = dataset[i]["input_ids"].tolist(), dataset[i]["position_ids"].tolist()
        assert positions[0] == 0
        for t in range(1, SEQ_LEN):
            expected = 0 if ids[t - 1] == tokenizer.eos_token_id else positions[t - 1] + 1
            assert positions[t] == expected, (i, t)
            restarts += expected == 0
    assert restarts >= 15


def test_packed_dataset_reads_several_shards_at_random_indices(tmp_path, tokenizer):
    streams = []
    for k in range(3):
        docs = make_docs(10 + 5 * k, seed=k)
        pack_documents(docs, tokenizer, tmp_path / f"part-{k}", PackConfig(seq_len=SEQ_LEN))
        streams.append(reference_stream(tokenizer, docs))
    (tmp_path / "notes.json").write_text("{}")  # not a shard: no .bin next to it
    dataset = PackedDataset(tmp_path)
    blocks = [s[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1] for s in streams for i in range((len(s) - 1) // SEQ_LEN)]
    assert len(dataset) == len(blocks) == dataset.metadata["num_blocks"]
    assert dataset.num_tokens == sum(map(len, streams)) and dataset.num_documents == 10 + 15 + 20
    for i in random.Random(0).sample(range(len(blocks)), 60) + [0, len(blocks) - 1]:
        assert dataset[i]["input_ids"].tolist() == blocks[i][:-1].tolist()
        assert dataset[i]["shift_labels"].tolist() == blocks[i][1:].tolist()
    assert torch.equal(dataset[-1]["input_ids"], dataset[len(dataset) - 1]["input_ids"])
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    # Shards given one by one (as .json or as prefix) are read in the order given.
    reordered = PackedDataset([tmp_path / "part-2.json", tmp_path / "part-0"])
    assert reordered[0]["input_ids"].tolist() == streams[2][:SEQ_LEN].tolist()


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65536, np.uint16), (65537, np.uint32), (70000, np.uint32)])
def test_token_dtype_follows_vocab_size(tmp_path, vocab_size, dtype):
    top = vocab_size - 1
    with PackedShardWriter(tmp_path / "s", seq_len=2, vocab_size=vocab_size, eos_id=0, tokenizer_fingerprint="f") as w:
        w.add_documents([[top, 1]])
        w.add_documents([np.array([2, top])])
    assert w.metadata["dtype"] == np.dtype(dtype).name
    assert np.fromfile(tmp_path / "s.bin", dtype=dtype).tolist() == [top, 1, 0, 2, top, 0]
    assert PackedDataset(tmp_path / "s", seq_len=2)[1]["input_ids"].tolist() == [0, 2]


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    for bad in ([5, 1000], [-1], [70000]):
        with pytest.raises(ValueError, match="token id"), \
                PackedShardWriter(tmp_path / "s", seq_len=4, vocab_size=1000, eos_id=0, tokenizer_fingerprint="f") as w:
            w.add_documents([bad])
        assert list(tmp_path.iterdir()) == []  # nothing left behind
    with pytest.raises(ValueError, match="eos_id"):
        PackedShardWriter(tmp_path / "s", seq_len=4, vocab_size=10, eos_id=10, tokenizer_fingerprint="f")


def test_incomplete_shards_are_ignored_and_failed_writes_leave_old_shard(tmp_path, tokenizer):
    pack_documents(make_docs(10), tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN))
    complete = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    shutil.copy(tmp_path / "s0.bin", tmp_path / "s1.bin")  # a .bin whose .json never landed
    dataset = PackedDataset(tmp_path)
    assert [p.name for p in dataset.shard_paths] == ["s0.json"]
    with pytest.raises(ValueError, match=r"s1\.json: no such packed shard"):
        PackedDataset(tmp_path / "s1")
    (tmp_path / "s1.bin").unlink()

    with pytest.raises(RuntimeError, match="interrupted"), \
            PackedShardWriter(tmp_path / "s0", SEQ_LEN, len(tokenizer), 0, "f") as writer:
        writer.add_documents([[1, 2, 3]])
        raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == complete

    meta = pack_documents(make_docs(3), tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(complete)
    assert PackedDataset(tmp_path).num_documents == meta["num_documents"] == 3


def test_mismatched_shards_fail_with_one_line_naming_the_shard(tmp_path):
    def write(name, fingerprint="f", seq_len=4, tokens=20):
        with PackedShardWriter(tmp_path / name, seq_len, 100, 0, fingerprint) as w:
            w.add_documents([list(range(1, tokens))])

    write("a")
    write("b", fingerprint="other")
    with pytest.raises(ValueError, match=r"b\.json: tokenizer_fingerprint 'other' differs") as err:
        PackedDataset(tmp_path)
    assert "\n" not in str(err.value)
    assert len(PackedDataset(tmp_path / "a", expected_fingerprint="f")) == 4
    with pytest.raises(ValueError, match=r"a\.json: tokenizer_fingerprint 'f' differs from the expected 'g'"):
        PackedDataset(tmp_path / "a", expected_fingerprint="g")
    with pytest.raises(ValueError, match=r"a\.json: seq_len 4 differs from the requested 8"):
        PackedDataset(tmp_path / "a", seq_len=8)
    write("c", seq_len=8)
    with pytest.raises(ValueError, match=r"c\.json: seq_len 8 differs"):
        PackedDataset([tmp_path / "a", tmp_path / "c"])
    with open(tmp_path / "c.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ValueError, match=r"c\.bin: 10 bytes, metadata says 40"):
        PackedDataset(tmp_path / "c")


def test_fim_rate_zero_is_plain_packing(tmp_path, tokenizer):
    docs = make_docs(20)
    pack_documents(docs, tokenizer, tmp_path / "plain", PackConfig(seq_len=SEQ_LEN))
    pack_documents(docs, tokenizer, tmp_path / "zero", PackConfig(seq_len=SEQ_LEN, fim_rate=0.0, seed=7))
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "zero.bin").read_bytes()
    # FIM output is a function of the seed and the documents only.
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        pack_documents(docs, tokenizer, tmp_path / name, PackConfig(seq_len=SEQ_LEN, fim_rate=0.5, seed=seed))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "plain.bin").read_bytes()


def test_document_without_text_is_one_line_error(tmp_path, tokenizer):
    docs = make_docs(3) + [{"id": "web.jsonl:7", "text": None, "kind": "text"}]
    with pytest.raises(ValueError, match=r"^web\.jsonl:7: 'text' must be a string, got NoneType$"):
        pack_documents(docs, tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN, batch_docs=2))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spm_rate", [0.5, 0.0, 1.0])
def test_fim_rewrites_every_code_document_and_keeps_its_text(tmp_path, tokenizer, spm_rate):
    pre, mid, suf = tokenizer.convert_tokens_to_ids([FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX])
    docs = make_docs(30)
    report = StepReport("pack")
    cfg = PackConfig(seq_len=SEQ_LEN, fim_rate=1.0, fim_spm_rate=spm_rate, seed=3)
    meta = pack_documents(docs, tokenizer, tmp_path / "s0", cfg, report)
    pieces = split_documents(np.fromfile(tmp_path / "s0.bin", dtype=np.uint16), np.load(tmp_path / "s0.idx.npy"))
    fim = FimSpec.from_config(cfg, tokenizer)
    formats, cut_inside = [], 0
    for position, (doc, ids) in enumerate(zip(docs, pieces)):
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        if doc["kind"] == "text":
            assert ids[:-1] == reference_ids(tokenizer, doc["text"])
            continue
        body, text = ids[:-1], doc["text"]
        assert (body.count(pre), body.count(mid), body.count(suf)) == (1, 1, 1)
        # The cut points are random; given them, the layout must be exactly the paper's.
        start, end, use_spm = fim.draw(text, position)
        prefix, middle, suffix = (reference_ids(tokenizer, t) for t in (text[:start], text[start:end], text[end:]))
        if use_spm:
            assert body == [pre, suf, *suffix, mid, *prefix, *middle]
            decoded = tokenizer.decode(body[body.index(mid) + 1:]) + tokenizer.decode(body[2:body.index(mid)])
        else:
            assert body == [pre, *prefix, suf, *suffix, mid, *middle]
            decoded = (tokenizer.decode(body[1:body.index(suf)]) + tokenizer.decode(body[body.index(mid) + 1:])
                       + tokenizer.decode(body[body.index(suf) + 1:body.index(mid)]))
        assert decoded == text
        formats.append("spm" if use_spm else "psm")
        cut_inside += bool(prefix and middle and suffix)
    assert meta["fim_documents"] == report.extra["fim_docs"] == len(formats) == 15
    expected_formats = {0.0: {"psm"}, 1.0: {"spm"}, 0.5: {"psm", "spm"}}[spm_rate]
    assert set(formats) == expected_formats and cut_inside >= 5
    assert meta["fim"]["rate"] == 1.0 and meta["fim"]["spm_rate"] == spm_rate


def test_fim_without_sentinel_tokens_is_one_clear_error(tmp_path, tokenizer, tmp_path_factory):
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    plain = train_tokenizer([text], TokenizerConfig(vocab_size=400, fim_tokens=False), tmp_path_factory.mktemp("t"))
    with pytest.raises(ValueError, match=r"pack\.fim_rate: is 0.5 but the tokenizer has no <\|fim_prefix\|>"):
        pack_documents(make_docs(4), plain, tmp_path / "s0", PackConfig(fim_rate=0.5))
    assert not list(tmp_path.iterdir())
    assert pack_documents(make_docs(4), plain, tmp_path / "s0", PackConfig(fim_rate=0.0))["num_documents"] == 4


def test_streaming_yields_the_packed_examples(tmp_path, tokenizer):
    docs = make_docs(40)
    cfg = PackConfig(seq_len=SEQ_LEN, fim_rate=0.5, batch_docs=7)
    pack_documents(docs, tokenizer, tmp_path / "s0", cfg)
    packed = PackedDataset(tmp_path, return_position_ids=True)
    # A different batch size must not change anything: FIM draws depend on document positions only.
    streaming = StreamingPackedDataset(docs, tokenizer, PackConfig(seq_len=SEQ_LEN, fim_rate=0.5, batch_docs=3),
                                       return_position_ids=True)
    assert_examples_equal(list(streaming), [packed[i] for i in range(len(packed))])


@pytest.mark.parametrize("source_type", ["list", "hf_iterable"])
def test_streaming_resume_is_exact(tokenizer, source_type):
    docs = make_docs(30)
    cfg = PackConfig(seq_len=SEQ_LEN, fim_rate=0.5, batch_docs=4)

    def make():
        source = docs
        if source_type == "hf_iterable":
            source = datasets.Dataset.from_list(docs).to_iterable_dataset(num_shards=3)
        return StreamingPackedDataset(source, tokenizer, cfg, return_position_ids=True)

    baseline = make()
    full, states = [], [baseline.state_dict()]
    for example in baseline:
        full.append(example)
        states.append(baseline.state_dict())  # the state after len(full) examples
    assert len(full) > 100
    mid_document = [k for k, s in enumerate(states) if s["skip_docs"] > 0 and len(s["carry"]) > 3 * SEQ_LEN]
    assert mid_document and all(len(s["carry"]) < SEQ_LEN + 1000 for s in states)
    for k in sorted({0, 1, 2, len(full) - 1, len(full), mid_document[0], mid_document[-1], *range(5, len(full), 37)}):
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(states[k])))  # the state survives a JSON round trip
        assert_examples_equal(full[:k] + list(resumed), full)
        finished = make()  # a state taken at the end, even of a pass that yielded nothing, stays at the end
        finished.load_state_dict(resumed.state_dict())
        assert list(finished) == []
    # The restored position is used once: the next pass over the same instance starts from the beginning.
    assert_examples_equal(list(resumed), full)

    # Resume twice: right after a resume the next blocks come from the restored carry, a second code path.
    k = mid_document[0]
    resumed = make()
    resumed.load_state_dict(states[k])
    iterator = iter(resumed)
    again = [next(iterator), next(iterator)]
    state = resumed.state_dict()
    assert state["skip_docs"] == 0 and state["carry"] == states[k]["carry"][2 * SEQ_LEN:]
    twice = make()
    twice.load_state_dict(state)
    assert_examples_equal(full[:k] + again + list(twice), full)

    with pytest.raises(ValueError, match="state_dict.seq_len: 16 does not match this dataset's 32"):
        StreamingPackedDataset(docs, tokenizer, PackConfig(seq_len=32)).load_state_dict(states[3])


def test_packed_dataset_in_dataloader_workers_matches_single_process(tmp_path, tokenizer):
    for k in range(2):
        pack_documents(make_docs(20, seed=k), tokenizer, tmp_path / f"s{k}", PackConfig(seq_len=SEQ_LEN))
    dataset = PackedDataset(tmp_path, return_position_ids=True)
    first = dataset[0]  # opens memory maps in this process before the workers fork
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._arrays == [] and torch.equal(copy[0]["input_ids"], first["input_ids"])

    def batches(num_workers):
        return list(DataLoader(dataset, batch_size=8, num_workers=num_workers))

    single, workers = batches(0), batches(2)
    assert len(single) == len(workers) == -(-len(dataset) // 8)
    assert_examples_equal(single, workers)


def test_shift_labels_give_the_loss_over_every_position(tmp_path, tokenizer):
    pack_documents(make_docs(10), tokenizer, tmp_path / "s0", PackConfig(seq_len=SEQ_LEN))
    batch = next(iter(DataLoader(PackedDataset(tmp_path), batch_size=4)))
    vocab_size = len(tokenizer)
    logits = torch.randn(4, SEQ_LEN, vocab_size)
    loss = ForCausalLMLoss(logits, labels=None, vocab_size=vocab_size, shift_labels=batch["shift_labels"])
    expected = F.cross_entropy(logits.view(-1, vocab_size), batch["shift_labels"].view(-1))
    assert torch.allclose(loss, expected)
    # labels=input_ids would drop the last position's target; shift_labels keeps all seq_len of them.
    dropped = ForCausalLMLoss(logits, labels=batch["input_ids"], vocab_size=vocab_size)
    assert torch.allclose(dropped, F.cross_entropy(logits[:, :-1].reshape(-1, vocab_size),
                                                   batch["shift_labels"][:, :-1].reshape(-1)))

    # The model computes a loss only when `labels` is given; with shift_labels also given, they win.
    model = tiny_model(vocab_size=vocab_size)
    assert model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"]).loss is None
    output = model(input_ids=batch["input_ids"], labels=batch["shift_labels"], shift_labels=batch["shift_labels"])
    expected = F.cross_entropy(output.logits.float().reshape(-1, vocab_size), batch["shift_labels"].view(-1))
    assert torch.allclose(output.loss, expected)


def test_pack_batches_are_capped_by_characters_and_the_output_does_not_depend_on_batching(tokenizer, tmp_path):
    from data_prep.packing import batched_documents

    docs = [{"text": "x" * n, "kind": "text"} for n in (5, 5, 30, 1, 1, 1)]
    assert [len(b) for b in batched_documents(docs, max_docs=4, max_chars=10)] == [2, 1, 3]
    assert [len(b) for b in batched_documents(docs, max_docs=2, max_chars=1000)] == [2, 2, 2]
    texts = make_docs(40)
    wide = pack_documents(texts, tokenizer, tmp_path / "wide", PackConfig(seq_len=SEQ_LEN))
    narrow = pack_documents(texts, tokenizer, tmp_path / "narrow", PackConfig(seq_len=SEQ_LEN, batch_chars=500))
    assert wide == narrow
    assert (tmp_path / "wide.bin").read_bytes() == (tmp_path / "narrow.bin").read_bytes()
