"""The benchmark scripts run end to end at toy size and write well-formed results (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_cpu_runs_and_writes_json(tmp_path):
    output = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "benchmarks" / "bench_model_cpu.py"),
            "--override", "hidden_size=64", "intermediate_size=128", "num_hidden_layers=2", "vocab_size=256",
            "--batch-size", "1", "--seq-len", "32", "--warmup", "0", "--rounds", "2", "--steps", "1",
            "--threads", "1", "--output", str(output),
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["equivalence_check"]  # logits were compared before timing
    assert len(report["rounds"]) == 2
    summary = report["summary"]
    for model in ("ember", "llama"):
        assert summary[model]["median_step_s"] > 0 and summary[model]["tokens_per_s"] > 0
    expected = summary["ember"]["median_step_s"] / summary["llama"]["median_step_s"]
    assert abs(summary["ratio_of_medians"] - expected) < 1e-9
