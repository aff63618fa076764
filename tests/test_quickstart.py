"""recipes/quickstart.py end to end at reduced size: every stage runs, the report holds every number, the
pretrained model beats its untrained self on held-out text, and a re-run skips the finished stages."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_error

from reporting.dashboard import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--data_overrides.num_shards=1", "--data_overrides.sources.0.max_docs=60",
    "--data_overrides.tokenizer.vocab_size=512", "--data_overrides.pack.seq_len=64",
    "--data_overrides.validation_fraction=0.1",
    "--pretrain_overrides={max_steps: 16, warmup_steps: 2, save_steps: 8, logging_steps: 2, eval_strategy: 'no', "
    "model_overrides: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 256}}",
    "--eval_window=64", "--eval_stride=32", "--eval_max_documents=2",
    "--instruction_max_examples=40",
    "--finetune_overrides={max_steps: 3, max_length: 256, logging_steps: 1}",
    "--max_new_tokens=6",
]


def quickstart(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "quickstart.py"),
                             f"--output_dir={output_dir}", *SMALL, *extra],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_quickstart_chains_every_stage_and_reruns_nothing(tmp_path):
    out = tmp_path / "quickstart"
    port = free_port()
    first = quickstart(out, "--dashboard", f"--dashboard_port={port}")  # watched live: both trainings in TensorBoard
    assert f"Dashboard: http://127.0.0.1:{port}/" in first.stdout and "Dashboard stopped" in first.stdout
    assert list((out / "pretrain" / "runs").glob("*/events.out.tfevents.*"))
    assert list((out / "finetune" / "runs").glob("*/events.out.tfevents.*"))
    with pytest.raises(OSError):  # the server ended with the quickstart
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    stages = ["data", "pretrain", "perplexity", "instructions", "finetune", "generate", "report"]
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == sorted(stages)

    results = json.loads((out / "results.json").read_text())
    headline = results["headline"]
    assert headline["pretrain_steps"] == 16
    assert headline["held_out_bpb_pretrained"] < headline["held_out_bpb_untrained"]  # it learned something
    assert headline["held_out_tokens_scored"] > 0 and headline["instruction_examples_train"] > 0
    assert headline["lora_trainable_parameters"] > 0
    assert headline["lora_response_loss_before"] > 0 and headline["lora_response_loss_after"] > 0
    assert (out / "pretrain" / "model.safetensors").is_file() and (out / "finetune" / "merged").is_dir()
    samples = results["stages"]["generate"]
    assert len(samples["pretrained"]) == 2 and len(samples["finetuned"]) == 1

    # The compressors' yardstick, on the same held-out documents the model was scored on.
    from data_prep.documents import read_documents
    from evaluation.baselines import compressor_bits_per_byte

    expected = compressor_bits_per_byte(read_documents(out / "data" / "documents" / "validation"), max_documents=2)
    assert headline["held_out_bpb_compressors"] == {name: r["bits_per_byte"] for name, r in expected.items()}
    assert list(expected) == ["gzip -9", "zstd -19", "xz -9e", "bzip2 -9", "brotli -q 11", "zpaq -m5"]
    assert results["stages"]["perplexity"]["compressors"]["xz -9e"]["bytes"] == sum(
        len(text.encode()) for text in list(read_documents(out / "data" / "documents" / "validation"))[:2])

    report = (out / "report.md").read_text()
    assert f"{headline['held_out_bpb_pretrained']:.3f}" in report
    assert f"| xz -9e (each document compressed on its own) | {expected['xz -9e']['bits_per_byte']:.3f} |" in report
    assert f"| brotli -q 11 (each document compressed on its own) | {expected['brotli -q 11']['bits_per_byte']:.3f} |" \
        in report
    zpaq = expected["zpaq -m5"]
    assert (f"| zpaq -m5 (each document compressed on its own) | {zpaq['bits_per_byte']:.3f} |" if zpaq["bits_per_byte"]
            else "| zpaq -m5 (each document compressed on its own) | not measured (zpaq not installed) |") in report
    assert f"{headline['lora_response_loss_after']:.3f}" in report
    # The plan's estimate beside each stage's time: how honest the plan was, in every run's report.
    estimated, measured = results["estimated_stage_seconds"], results["stage_seconds"]
    assert set(estimated) == set(measured) and estimated["pretrain"] > 0
    assert ("| stage | time | plan's estimate | time / estimate | corrected by pretraining's steps "
            "| time / corrected |") in report
    assert f"| {measured['pretrain'] / estimated['pretrain']:.2f} |" in report
    # and corrected once pretraining has timed its first tenth (steps 3-12 of 16): pretraining and what follows
    corrected = results["corrected_stage_seconds"]
    assert corrected["data"] is None and corrected["pretrain"] > 0 and corrected["finetune"] > 0
    assert f"| {measured['pretrain'] / corrected['pretrain']:.2f} |" in report
    assert "[eta] " in first.stdout
    assert "Plan, corrected by pretraining's own steps: the stages left take" in first.stdout
    finetune = json.loads((out / "finetune" / "finetune_metrics.json").read_text())
    assert headline["lora_examples_trained"] == finetune["data"]["train"]["examples"]  # what trained
    assert f"| examples trained on (pairs with a response token left within max_length) | " \
           f"{headline['lora_examples_trained']:,} |" in report
    assert "![LoRA training loss](lora_loss.png)" in report and (out / "lora_loss.png").stat().st_size > 1000
    assert "| pretrain | learning_rate |" in report and "| finetune | lora_r |" in report
    for plot in (out / "pretrain" / "run_report").glob("*.png"):
        assert f"pretrain/run_report/{plot.name}" in report
    # Written to a file, the output still shows the plan, progress in every stage and each stage's numbers.
    lines = first.stdout.splitlines()
    assert lines[lines.index(next(line for line in lines if line.startswith("Plan (")))+1].startswith(
        "  data preparation")
    for number, title in enumerate(["data preparation", "pretraining", "held-out perplexity", "instruction set",
                                    "LoRA finetuning", "generation", "report"], start=1):
        assert f"=== [{number}/7] {title} ===" in lines
    assert "[data_prep] filter 1/1 shards" in first.stdout and "[data_prep] tokenizer done" in first.stdout
    assert any(line.startswith("step 2/16 | loss ") for line in lines)  # pretraining logs, as numbers
    assert any(line.startswith("step 1/3 | loss ") for line in lines)  # LoRA logs
    bpb = f"{headline['held_out_bpb_untrained']:.3f} (untrained) -> {headline['held_out_bpb_pretrained']:.3f}"
    assert sum(bpb in line for line in lines) == 2  # after the stage and in the closing summary
    assert "Summary" in lines and "'loss'" not in first.stdout

    again = quickstart(out)
    assert again.stdout.count("done in an earlier run") == len(stages)

    # The run_clm comparison on this output: the stock model trained with Ember's recipe reproduces Ember's
    # number (same initialisation, same maths), run_clm's defaults are a separate, real training run.
    bench = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_quickstart_vs_run_clm.py"),
                            f"--quickstart_dir={out}", f"--output={tmp_path / 'vs_run_clm'}",
                            "--seconds=600"],  # no wall-clock cap: a busy test machine must not cut runs short
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bench.returncode == 0, bench.stderr[-4000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "vs_run_clm.json").read_text())["rows"]}
    ember, run_clm, recipe = rows["ember (quickstart)"], rows["llama + run_clm defaults"], rows["llama + ember recipe"]
    assert ember["bits_per_byte"] == headline["held_out_bpb_pretrained"]
    assert recipe["steps"] == 16 and run_clm["steps"] == 8  # the same tokens: batch 8 instead of 4
    assert abs(recipe["bits_per_byte"] / ember["bits_per_byte"] - 1) < 1e-4
    assert run_clm["bits_per_byte"] != ember["bits_per_byte"] and run_clm["bpb_vs_run_clm"] == 1.0
    assert json.loads((out / "results.json").read_text())["headline"] == headline


def test_quickstart_config_mistake_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "quickstart.py"), "--eval_windw=64"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert recipe_error(result.stderr) == ("error: eval_windw: unknown key (did you mean 'eval_window'? --help lists "
                                           "every key)")


def test_report_fences_any_prompt():
    from reporting.quickstart_report import _fenced

    assert _fenced("is `x` even?") == ["```", "is `x` even?", "```"]
    assert _fenced("a ```python block```") == ["````", "a ```python block```", "````"]
