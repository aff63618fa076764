"""The benchmark scripts run end to end at toy size and write well-formed results (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_cpu_runs_and_writes_json(tmp_path):
    output = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "benchmarks" / "bench_model_cpu.py"),
            "--override", "hidden_size=64", "intermediate_size=128", "num_hidden_layers=2", "vocab_size=256",
            "--batch_size", "1", "--seq_len", "32", "--warmup", "0", "--rounds", "2", "--steps", "1",
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


def test_bench_data_prep_runs_and_writes_json(tmp_path):
    output = tmp_path / "data_prep.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "benchmarks" / "bench_data_prep.py"),
            "--max_mb", "0.3", "--rounds", "1", "--scales", "1", "2", "--seq_len", "128", "--vocab_size", "512",
            "--threads", "1", "--workdir", str(tmp_path / "work"), "--output", str(output),
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["machine"]["tokenizer_threads"]["effective"] == 1
    assert {"tokenizers", "datasets", "transformers", "cpu_model"} <= set(report["machine"])

    # Both paths saw the same tokens; Ember's count has exactly one EOS per document on top.
    check, corpus = report["token_check"], report["corpus"]
    assert check["ok"] and check["same_token_ids"]
    assert check["ember_tokens"] == check["run_clm_tokens"] == corpus["tokens"] > 0
    assert check["ember_tokens_with_eos"] == check["ember_tokens"] + corpus["documents"]
    assert corpus["bytes"] >= 300_000

    assert len(report["rounds"]) == 1
    throughput = report["summary"]["throughput"]
    for method in ("ember", "run_clm"):
        assert throughput[method]["median_s"] > 0 and throughput[method]["mb_per_s"] > 0
        assert throughput[method]["tokens_per_s"] > 0
    expected = throughput["run_clm"]["median_s"] / throughput["ember"]["median_s"]
    assert abs(throughput["speed_ratio_of_medians"] - expected) < 1e-9
    assert abs(throughput["ember"]["mb_per_s"] / throughput["run_clm"]["mb_per_s"] - expected) < 1e-9
    assert throughput["minhash"]["docs_per_s"] > 0
    # The raw tokenizer rate on the same documents, side by side with the packer.
    expected = throughput["encode"]["median_s"] / throughput["ember"]["median_s"]
    assert throughput["encode"]["median_s"] > 0 and abs(throughput["pack_vs_encode_of_medians"] - expected) < 1e-9

    # One fresh process per (path, scale); the doubled stream really carried twice the documents.
    measurements = {(m["method"], m["scale"]): m for m in report["memory"]}
    assert set(measurements) == {(method, scale) for method in ("ember", "run_clm") for scale in (1, 2)}
    for (_, scale), measurement in measurements.items():
        assert measurement["documents"] == scale * corpus["documents"]
        assert measurement["peak_rss_mib"] > 0
        # Nothing of the parent's peak leaked into the child's ru_maxrss: it matches the child's own VmHWM.
        own_peak = measurement["proc_status_at_end_mib"].get("VmHWM")
        if own_peak is not None:  # Linux
            assert measurement["peak_rss_mib"] - own_peak < 64
    memory = report["summary"]["memory"]
    for method in ("ember", "run_clm"):
        growth = measurements[(method, 2)]["peak_rss_mib"] / measurements[(method, 1)]["peak_rss_mib"]
        assert abs(memory[method]["growth"] - growth) < 1e-9

    # In process, on hand-made input: the recipe's grouping drops the tail, and the token check refuses a corpus
    # that the two paths tokenize differently (run_clm's tokenizer call matches special-token text, Ember's does not).
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # where the script finds bench_common when run
    try:
        import bench_data_prep as bench
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    batch = {"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1]]}
    assert bench.group_into_blocks(batch, 2) == {"input_ids": [[1, 2], [3, 4]], "attention_mask": [[1, 1], [1, 1]]}
    texts = ["def add(a, b):\n    return a + b\n", "EOS = '<|endoftext|>'\n"]
    paths = []
    for index, text in enumerate(texts):
        paths.append(tmp_path / f"doc{index}.py")
        paths[-1].write_text(text, encoding="utf-8")
    tokenizer = bench.train_tokenizer(texts, bench.TokenizerConfig(vocab_size=300), tmp_path / "tokenizer")
    assert bench.check_same_tokens(paths[:1], texts[:1], tokenizer, 4, tmp_path)["ok"]
    mismatch = bench.check_same_tokens(paths, texts, tokenizer, 4, tmp_path)
    assert not mismatch["ok"] and not mismatch["same_token_ids"]
    assert mismatch["ember_tokens"] > mismatch["run_clm_tokens"]


def test_gpu_session_script_runs_every_step_at_smoke_size(tmp_path, data_dir):
    """The device script, shrunk to a CPU run: every step starts, finishes and leaves its results."""
    results = tmp_path / "results"
    env = {**os.environ, "SMOKE": "1", "WHEELS": "", "RESULTS": str(results), "DATA": str(data_dir),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_session.sh")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "failed steps: none" in result.stdout
    assert "python 3" in (results / "machine.txt").read_text()
    for name in ("tput_125m", "tput_1b"):
        rows = json.loads((results / f"{name}.json").read_text())["rows"]
        assert rows and all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows), rows
    sweep = {row["batch_size"] for row in json.loads((results / "tput_1b.json").read_text())["rows"]}
    assert sweep == {1, 2}
    state = json.loads((results / "stability_trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (results / "stability").exists()  # weights not kept


def test_bench_pipeline_engines_runs_and_writes_json(tmp_path):
    """Both comparisons at the smallest size: Ember's run vs datatrove's pipeline on the same corpus, and the
    local vs the Ray executor (outputs equal byte for byte)."""
    pytest.importorskip("ray")
    output = tmp_path / "engines.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_pipeline_engines.py"), "--rounds", "1",
         "--corpus_docs", "120", "--max_docs", "40", "--output", str(output)],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    engines = report["ember_vs_datatrove"]
    assert engines["documents_in"] == 120
    round_ = engines["rounds"][0]
    assert round_["ember"]["tokens"] > 0 and round_["datatrove"]["tokens"] > 0
    assert abs(round_["datatrove_over_ember"] - round_["datatrove"]["seconds"] / round_["ember"]["seconds"]) < 1e-9
    ray_run = report["local_vs_ray"]["rounds"][0]
    assert ray_run["identical_outputs"] is True
    assert ray_run["local"]["seconds"] > 0 and ray_run["ray"]["seconds"] > 0
    assert "load_1m_at_start" in report and report["machine"]["cores_available"] >= 1


def test_bench_data_scaling_runs_every_part_on_a_small_archive(tmp_path):
    """The scaling benchmark on a small archive in the kernel's place: both pipelines per slice with their step
    curves and dedup agreement, tokenize + pack against the tokenizer library, and linux.yaml run as a user runs it,
    killed with SIGKILL part way and resumed to byte-identical outputs."""
    import sysconfig
    import tarfile

    archive = tmp_path / "linux-small.tar.xz"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(stdlib.glob("*.py"))[:60]:  # .py is one of linux.yaml's code extensions
            tar.add(path, arcname=f"linux/lib/{path.name}")
        tar.add(stdlib / "LICENSE.txt", arcname="linux/Documentation/license.txt")
    output = tmp_path / "scaling.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_data_scaling.py"), "--archive", str(archive),
         "--sizes", "300000", "0", "--rounds", "1", "--work", str(tmp_path / "work"), "--output", str(output)],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(output.read_text())
    engines = record["engines"]
    assert set(engines) == {"0.3MB", "all"} and engines["0.3MB"]["documents"] < engines["all"]["documents"] == 60
    run = engines["all"]["rounds"][0]
    for engine in ("ember", "datatrove"):
        assert run[engine]["tokens"] > 0 and run[engine]["tree_rss_mb"] > 0 and run[engine]["cpu_s"] > 0
    assert set(run["ember"]["steps"]) == {"filter", "dedup", "split", "tokenizer", "pack"}
    assert "minhash_signatures" in run["datatrove"]["steps"]
    agreement = run["dedup_agreement"]
    assert agreement["both"] + agreement["only_ember"] == agreement["ember"]
    tokenize = record["tokenize"]
    assert tokenize["encoder"] == "tiktoken" and tokenize["ember_mb_per_s"] > 0
    assert set(tokenize["pack_step_s"]) == {"1", "2"}
    user = record["user"]
    assert user["records"]["balanced"] and user["tokens_train"]["num_tokens"] > 0
    assert user["kill_resume"]["byte_identical"] is True and user["kill_resume"]["files_compared"] > 10
