"""evaluation.perplexity and recipes/eval_perplexity.py: sliding-window perplexity against independent references.

References: a per-target loop that rebuilds each target's context from the window definition (one forward
pass per target, no batching or padding), the Trainer's eval_loss on packed blocks, and lm-eval's
loglikelihood_rolling on the local rolling task in tests/data/lm_eval_tasks.
"""

import json
import math

import pytest
import torch
import zstandard
from conftest import REPO_ROOT, tiny_model
from transformers import Trainer, TrainingArguments

from data_prep.documents import read_documents
from data_prep.io import read_docs, write_docs
from data_prep.packing import PackedShardWriter
from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from evaluation.perplexity import evaluate_packed_perplexity, evaluate_path, evaluate_perplexity, window_spans
from recipes import eval_perplexity as recipe
from training.trainer import collate_packed

TASKS = REPO_ROOT / "tests" / "data" / "lm_eval_tasks"
RTOL = 1e-4
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nfor name in sorted(os.listdir('.')):\n    print(name)\n",
    "x",
    "Dictionaries map keys to values; dict.get returns a default for a missing key, résumé.",
]


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return load_tokenizer(data_dir / "tokenizer")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(vocab_size=len(tokenizer))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logprobs(model, tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix of `tokens` (plain causal forward, positions 0..)."""
    with torch.no_grad():
        return model(torch.tensor([tokens]), use_cache=False).logits[0].float().log_softmax(-1)


def reference_nll(model, stream: list[int], window: int, stride: int, eos_id: int | None = None) -> float:
    """Total NLL from the definition: target j lies in the first window whose end reaches it, window k ends at
    min(window + k * stride, n) and has `window` inputs. With `eos_id`, context also starts after an EOS.
    Targets with the same context start share one forward pass (causal attention makes that exact)."""
    n = len(stream) - 1
    targets_by_start: dict[int, list[int]] = {}
    for j in range(1, n + 1):
        k = 0 if j <= window else math.ceil((j - window) / stride)
        start = max(0, min(window + k * stride, n) - window)
        if eos_id is not None:  # the document of input j - 1 starts after the latest EOS before it
            start = max([start] + [i + 1 for i in range(j - 1) if stream[i] == eos_id])
        targets_by_start.setdefault(start, []).append(j)
    total = 0.0
    for start, targets in targets_by_start.items():
        scores = logprobs(model, stream[start:max(targets)])
        total -= sum(float(scores[j - 1 - start, stream[j]]) for j in targets)
    return total


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_window_spans_score_every_target_once_with_enough_context():
    for num_targets in range(0, 30):
        for window in range(1, 7):
            for stride in range(1, window + 1):
                scored = []
                for start, end, num_scored in window_spans(num_targets, window, stride):
                    assert 0 <= start < end and end - start <= window and 1 <= num_scored <= end - start
                    for target in range(end - num_scored + 1, end + 1):
                        assert target - start >= min(target, window - stride + 1)  # inputs before the target
                        scored.append(target)
                assert scored == list(range(1, num_targets + 1))
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)


def test_equals_token_by_token_full_context_when_window_covers_text(model, tokenizer):
    text = TEXTS[0]
    stream = [tokenizer.eos_token_id] + encode(tokenizer, text)
    result = evaluate_perplexity(model, tokenizer, [text], window=64, progress=False)
    expected = -sum(float(logprobs(model, stream[:j])[-1, stream[j]]) for j in range(1, len(stream)))
    assert result.num_tokens == len(stream) - 1 and result.num_bytes == len(text.encode())
    assert result.total_nll == pytest.approx(expected, rel=RTOL)
    assert result.mean_nll == pytest.approx(expected / result.num_tokens, rel=RTOL)
    assert result.perplexity == pytest.approx(math.exp(expected / result.num_tokens), rel=RTOL)
    assert result.bits_per_byte == pytest.approx(expected / (math.log(2) * len(text.encode())), rel=RTOL)
    assert (result.window, result.stride, result.mode, result.skipped_documents) == (64, 32, "documents", 0)


@pytest.mark.parametrize("window, stride", [(8, 8), (8, 3), (6, 1), (5, 4)])
def test_short_windows_match_the_definition(model, tokenizer, window, stride):
    text = TEXTS[0] + TEXTS[1]
    stream = [tokenizer.eos_token_id] + encode(tokenizer, text)
    assert len(stream) > 3 * window  # several windows and a last partial one
    result = evaluate_perplexity(model, tokenizer, [text], window=window, stride=stride, batch_size=3,
                                 progress=False)
    assert result.num_tokens == len(stream) - 1
    assert result.total_nll == pytest.approx(reference_nll(model, stream, window, stride), rel=RTOL)


def test_batch_size_does_not_change_the_numbers(model, tokenizer):
    for concatenate in (False, True):
        one, four = (evaluate_perplexity(model, tokenizer, TEXTS, window=12, stride=5, batch_size=size,
                                         concatenate=concatenate, progress=False) for size in (1, 4))
        assert one.num_tokens == four.num_tokens and one.num_bytes == four.num_bytes
        assert four.total_nll == pytest.approx(one.total_nll, rel=RTOL)


def test_concatenated_stream_scores_eos_and_keeps_documents_apart(model, tokenizer):
    eos = tokenizer.eos_token_id
    stream = [eos]
    for text in TEXTS:
        stream += encode(tokenizer, text) + [eos]
    result = evaluate_perplexity(model, tokenizer, TEXTS, window=16, stride=7, batch_size=4, concatenate=True,
                                 progress=False)
    assert result.mode == "concatenated" and result.num_tokens == len(stream) - 1
    assert result.num_bytes == sum(len(text.encode()) for text in TEXTS)
    assert result.total_nll == pytest.approx(reference_nll(model, stream, 16, 7, eos_id=eos), rel=RTOL)


def test_empty_documents_are_skipped_and_counted(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, ["", TEXTS[0], ""], window=16, progress=False)
    alone = evaluate_perplexity(model, tokenizer, [TEXTS[0]], window=16, progress=False)
    assert (result.num_documents, result.skipped_documents) == (3, 2)
    assert result.total_nll == pytest.approx(alone.total_nll, rel=RTOL) and result.num_tokens == alone.num_tokens
    nothing = evaluate_perplexity(model, tokenizer, [""], window=16, progress=False)
    assert nothing.num_tokens == 0 and math.isnan(nothing.perplexity) and nothing.bits_per_byte is None


def test_max_documents_and_window_limit(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, TEXTS, window=16, max_documents=2, progress=False)
    assert result.num_documents == 2
    assert result.num_bytes == sum(len(text.encode()) for text in TEXTS[:2])
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        evaluate_perplexity(model, tokenizer, TEXTS, window=257)


def test_reads_jsonl_zst_and_folders_with_line_numbered_errors(tmp_path, data_dir):
    folder = tmp_path / "documents" / "validation"
    write_docs(folder / "00000-of-00002.jsonl.zst", [{"id": "a", "text": TEXTS[0]}, {"id": "b", "text": TEXTS[1]}])
    (folder / "00001-of-00002.jsonl").write_text(json.dumps({"body": TEXTS[2]}) + "\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"00001-of-00002\.jsonl:1: no 'text' field"):
        list(read_documents(folder))
    assert list(read_documents(folder / "00001-of-00002.jsonl", text_field="body")) == [TEXTS[2]]
    (folder / "00001-of-00002.jsonl").write_text(json.dumps({"text": TEXTS[2]}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"00001-of-00002\.jsonl:2: not valid JSON"):
        list(read_documents(folder))
    (folder / "00001-of-00002.jsonl").write_text(json.dumps({"text": 7}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: field 'text' is not a string"):
        list(read_documents(folder))
    (folder / "00001-of-00002.jsonl").unlink()
    assert list(read_documents(folder)) == TEXTS[:2]

    broken = tmp_path / "broken.jsonl.zst"
    broken.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "fine"}\nnot json\n'))
    with pytest.raises(ValueError, match=r"broken\.jsonl\.zst:2: not valid JSON"):
        list(read_documents(broken))
    with pytest.raises(ValueError, match="no such file"):
        list(read_documents(tmp_path / "missing.jsonl"))

    validation = data_dir / "documents" / "validation"  # data_prep's own held-out documents
    expected = [doc["text"] for shard in sorted(validation.glob("*.jsonl.zst")) for doc in read_docs(shard)]
    assert expected and list(read_documents(validation)) == expected


def write_shard(prefix, token_lists, seq_len, tokenizer, **extra) -> dict:
    with PackedShardWriter(prefix, seq_len, len(tokenizer), tokenizer.eos_token_id,
                           tokenizer_fingerprint(tokenizer), extra) as writer:
        writer.add_documents(token_lists)
    return writer.metadata


def test_packed_shards_match_trainer_eval_loss(model, tokenizer, data_dir, tmp_path):
    tokens = [t for shard in sorted((data_dir / "documents" / "validation").glob("*.jsonl.zst"))
              for doc in read_docs(shard) for t in encode(tokenizer, doc["text"])]
    assert len(tokens) > 700
    shards = tmp_path / "tokens" / "validation"
    write_shard(shards / "00000-of-00002", [tokens[:150], tokens[150:260], tokens[260:400]], 32, tokenizer)
    write_shard(shards / "00001-of-00002", [tokens[400:700]], 32, tokenizer)
    dataset = PackedDataset(shards, return_position_ids=True)  # what recipes/pretrain.py evaluates on
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=4, use_cpu=True,
                             remove_unused_columns=False, report_to="none")
    eval_loss = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=collate_packed).evaluate()[
        "eval_loss"]

    result = evaluate_packed_perplexity(model, shards, window=32, stride=32, batch_size=3, progress=False)
    assert result.mode == "packed" and result.num_tokens == len(dataset) * 32
    assert result.perplexity == pytest.approx(math.exp(eval_loss), rel=RTOL)
    assert result.bits_per_byte is None and "records no text_bytes" in result.note
    overlapping = evaluate_path(model, tokenizer, shards, window=32, stride=8, batch_size=4, progress=False)
    assert overlapping.num_tokens == result.num_tokens and overlapping.total_nll != result.total_nll
    with pytest.raises(ValueError, match="max_documents: not supported for packed"):
        evaluate_path(model, tokenizer, shards, max_documents=3)


def test_packed_bits_per_byte_needs_recorded_bytes_and_no_remainder(model, tokenizer, tmp_path):
    exact = [list(range(10, 40)), list(range(40, 73))]  # 30 + 1 + 33 + 1 = 65 = 4 blocks of 16, plus one
    write_shard(tmp_path / "exact" / "shard", exact, 16, tokenizer, text_bytes=200)
    result = evaluate_packed_perplexity(model, tmp_path / "exact", window=16, stride=16, progress=False)
    assert (result.num_tokens, result.num_bytes, result.note) == (64, 200, None)
    assert result.bits_per_byte == pytest.approx(result.total_nll / (math.log(2) * 200), rel=1e-9)
    write_shard(tmp_path / "tail" / "shard", exact + [[5, 6, 7]], 16, tokenizer, text_bytes=210)
    tail = evaluate_packed_perplexity(model, tmp_path / "tail", window=16, stride=16, progress=False)
    assert tail.bits_per_byte is None and tail.note == ("4 tokens after the last full block of a shard are not "
                                                        "scored; bits_per_byte unavailable: text_bytes also counts "
                                                        "the unscored tokens")


def test_matches_lm_eval_loglikelihood_rolling(model, tokenizer):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval scores each document in disjoint windows of max_length inputs behind a BOS (== EOS here) prefix.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=16, batch_size=4, device="cpu")
    output = simple_evaluate(model=lm, tasks=["ember_python_text"], log_samples=True,
                             task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    samples = output["samples"]["ember_python_text"]
    lm_eval_nll = -sum(sample["filtered_resps"][0] for sample in samples)
    ours = evaluate_perplexity(model, tokenizer, read_documents(TASKS / "python_text.jsonl"), window=16, stride=16,
                               batch_size=4, progress=False)
    assert ours.num_documents == len(samples) == 6
    assert ours.total_nll == pytest.approx(lm_eval_nll, rel=RTOL)
    assert ours.bits_per_byte == pytest.approx(output["results"]["ember_python_text"]["bits_per_byte,none"], rel=RTOL)


def test_cli_on_ember_and_llama_checkpoints(model, tokenizer, tmp_path, capsys):
    from modeling.convert import to_hf

    ember_dir, llama_dir = tmp_path / "ember", tmp_path / "llama"
    model.save_pretrained(ember_dir)
    tokenizer.save_pretrained(ember_dir)
    to_hf(ember_dir, llama_dir)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS), encoding="utf-8")
    expected = evaluate_perplexity(model, tokenizer, TEXTS, window=16, stride=4, progress=False)

    for checkpoint in (ember_dir, llama_dir):
        output = tmp_path / f"{checkpoint.name}.json"
        assert recipe.main([f"--model={checkpoint}", f"--data={data}", "--text_field=content", "--window=16",
                            "--stride=4", "--batch_size=4", "--device=cpu", f"--output={output}"]) == 0
        written = json.loads(output.read_text())
        assert written["model"] == str(checkpoint) and written["data"] == str(data)
        assert written["num_tokens"] == expected.num_tokens and written["num_documents"] == len(TEXTS)
        assert written["perplexity"] == pytest.approx(expected.perplexity, rel=RTOL)
        assert written["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=RTOL)
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits / byte" in table and f"{expected.num_tokens:,}" in table

    # Without --output the result goes next to the model, named after the data; batched by default.
    assert recipe.main([f"--model={ember_dir}", f"--data={data}", "--text_field=content", "--window=16",
                        "--stride=4", "--device=cpu"]) == 0
    written = json.loads((ember_dir / f"perplexity_{tmp_path.name}_texts.jsonl.json").read_text())
    assert written["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=RTOL)
    assert recipe.PerplexityArguments.__dataclass_fields__["batch_size"].default > 1


def test_cli_errors_are_one_line(model, tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    capsys.readouterr()  # the save's progress bars
    for data_path, message in [(tmp_path / "missing.txt", f"{tmp_path / 'missing.txt'}: no such file or folder"),
                               (bad, f"{bad}:2: not valid JSON")]:
        assert recipe.main([f"--model={checkpoint}", f"--data={data_path}", "--window=16"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}")

    assert recipe.main([f"--model={tmp_path / 'nope'}", f"--data={bad}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such model directory"]
    assert recipe.main([f"--model={tmp_path}", f"--data={bad}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path}: not a model directory (no config.json or adapter_config.json)"]
    assert recipe.main([f"--model={checkpoint}", f"--data={bad}", "--window=2.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: window: expected an integer, got '2.5'"]
