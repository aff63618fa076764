"""benchmarks/train_throughput.py runs the recipe's Trainer on CPU at toy size and reports consistent rows."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.token_dataset import PackedDataset
from modeling import EmberConfig, sizing

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "train_throughput.py"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256}


def load_harness_module():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling bench_common
    try:
        import train_throughput
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return train_throughput


def run_harness(tmp_path: Path, *extra: str) -> tuple[int, dict | None]:
    """The harness's main() in this process (its imports are the slow part of a run at this size)."""
    output = tmp_path / "throughput.json"
    status = load_harness_module().main(["--device", "cpu", "--steps", "2", "--warmup_steps", "1",
                                         "--output", str(output), *extra])
    return status, json.loads(output.read_text()) if output.exists() else None


def test_both_models_two_variants_synthetic_data(tmp_path, capsys):
    seq_len, batch, steps, peak = 32, 2, 2, 1e12
    status, report = run_harness(
        tmp_path, "--preset", "nano", "--model_overrides", json.dumps(TINY), "--seq_len", str(seq_len),
        "--batch_sizes", str(batch), "--position_ids", "on,off", "--peak_flops", str(peak), "--matmul_size", "128")
    stdout = capsys.readouterr().out
    assert status == 0, stdout[-3000:]
    rows = report["rows"]
    assert sorted((r["model"], r["variant"]) for r in rows) == [
        ("ember", "sdpa+causal"), ("ember", "sdpa+docpos"), ("llama", "sdpa+causal"), ("llama", "sdpa+docpos")]
    assert "sdpa+docpos" in stdout and "ember/llama" in stdout  # the table was printed

    config = EmberConfig.from_preset("nano", **TINY, max_position_embeddings=seq_len)
    flops_per_token = sizing.flops_per_token(config, seq_len)
    assert report["flops_per_token"] == pytest.approx(flops_per_token)
    assert report["peak_flops"] == peak and report["measured_peak_flops"] > 0
    for row in rows:
        estimate = sizing.memory_per_gpu(config, 1, "ddp", batch, seq_len, param_bytes=4, flash_attention=True,
                                         attention_mask=row["settings"]["position_ids"], gradients_persist=False)
        assert row["status"] == "ok"
        assert row["parameters"] == report["parameters"] == sum(sizing.parameter_breakdown(config).values())
        assert row["tokens"] == steps * batch * seq_len
        assert len(row["step_seconds"]) == steps and row["seconds"] == pytest.approx(sum(row["step_seconds"]))
        assert row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        achieved = flops_per_token * row["tokens_per_s"]
        assert row["tflops"] == pytest.approx(achieved / 1e12)
        assert row["mfu_datasheet"] == pytest.approx(achieved / peak)
        assert row["mfu_measured"] == pytest.approx(achieved / report["measured_peak_flops"])
        assert row["peak_memory_kind"] == "process_peak_rss" and row["peak_memory_gib"] > 0
        assert row["estimated_memory_gib"] == pytest.approx(estimate["total"] / 2**30)
        assert row["estimate_error_pct"] == pytest.approx(
            100 * (row["estimated_memory_gib"] - row["peak_memory_gib"]) / row["peak_memory_gib"])
        assert math.isfinite(row["train_loss"]) and row["skipped_steps"] == 0
    by_key = {(r["model"], r["variant"]): r for r in rows}
    for variant in ("sdpa+docpos", "sdpa+causal"):
        ember, llama = by_key["ember", variant], by_key["llama", variant]
        assert ember["ember_over_llama"] == pytest.approx(ember["tokens_per_s"] / llama["tokens_per_s"])
        assert "ember_over_llama" not in llama
        assert ember["settings"]["position_ids"] == (variant == "sdpa+docpos")


def test_data_dir_shards_no_known_peak_and_liger_not_applicable(tmp_path, data_dir):
    status, report = run_harness(
        tmp_path, "--data_dir", str(data_dir), "--preset", "nano",
        "--model_overrides", json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}),
        "--batch_sizes", "2", "--liger", "off,on", "--matmul_size", "0")
    assert status == 0
    assert report["data"] == str(data_dir) and report["seq_len"] == 64  # taken from the shards
    assert report["ember_config"]["vocab_size"] == 512  # from the tokenizer, as the recipe does
    assert report["peak_flops"] is None and report["measured_peak_flops"] is None
    rows = {(r["model"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(m, v) for m in ("ember", "llama") for v in ("sdpa+docpos", "sdpa+docpos+liger")}
    for model in ("ember", "llama"):
        row = rows[model, "sdpa+docpos"]
        assert row["status"] == "ok" and row["tokens"] == 2 * 2 * 64 and row["tokens_per_s"] > 0
        assert row["mfu_datasheet"] is None and row["mfu_measured"] is None  # CPU: no peak known
        assert row["parameters"] == rows["ember", "sdpa+docpos"]["parameters"]
        liger = rows[model, "sdpa+docpos+liger"]
        assert liger["status"].startswith("n/a") and "tokens_per_s" not in liger  # reported, never faked
    assert "'ember' is not one" in rows["ember", "sdpa+docpos+liger"]["status"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model_overrides", "{nope"], "error: --model_overrides: not valid JSON"),
    (["--model_overrides", '{"sliding_window": 16}'], "error: model_overrides: the comparison is against stock Llama"),
    (["--model_overrides", '{"norm_type": "layernorm"}'], "error: norm_type:"),
    (["--data_dir", "/nonexistent/ember-data"], "error: "),
])
def test_bad_input_is_one_line_error(argv, message, capsys):
    harness = load_harness_module()
    assert harness.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_synthetic_blocks_have_the_shards_format(data_dir):
    harness = load_harness_module()
    synthetic = harness.SyntheticPackedDataset(4, 64, vocab_size=512, eos_id=0, doc_len=8, return_position_ids=True)
    real = PackedDataset(data_dir / "tokens" / "train", return_position_ids=True)
    example, reference = synthetic[0], real[0]
    assert example.keys() == reference.keys()
    for key in example:
        assert example[key].dtype == reference[key].dtype and example[key].shape == reference[key].shape
    ids, labels, positions = (example[k].numpy() for k in ("input_ids", "shift_labels", "position_ids"))
    assert np.array_equal(ids[1:], labels[:-1])  # labels are the next tokens
    assert (ids == 0).any() and ids.max() < 512
    starts = np.flatnonzero(positions == 0)  # documents start at the block start and right after each EOS
    assert starts.tolist() == [0, *(np.flatnonzero(ids[:-1] == 0) + 1).tolist()]
    without = harness.SyntheticPackedDataset(4, 64, vocab_size=512, eos_id=0, doc_len=8, return_position_ids=False)
    assert set(without[0]) == {"input_ids", "shift_labels"}
    assert np.array_equal(without[0]["input_ids"].numpy(), ids)  # same seed, same tokens
