"""The run plan (training/plan.py) and the run shell the training recipes share (training/run.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from transformers import TrainingArguments

from cli import ConfigError
from modeling import EmberConfig
from training.arguments import OptimizerArguments, PretrainingArguments
from training.checkpoints import output_dir_lock
from training.plan import RunPlan, plan_run, probe_step_seconds
from training.run import recipe_main, train_and_finish


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3,
                "max_steps": 10, "use_cpu": True, "report_to": "none", **overrides}
    return TrainingArguments(**settings)


def test_a_full_step_counts_rows_of_every_data_parallel_rank(tmp_path):
    plan = plan_run(training_args(tmp_path), PretrainingArguments(), seq_len=64)
    assert (plan.tokens_per_step, plan.global_batch_size, plan.max_steps) == (4 * 3 * 64, 12, 10)
    assert plan.step_tokens(1) == plan.step_tokens(10) == plan.tokens_per_step
    assert plan.total_tokens == plan.tokens_after(10) == 10 * 4 * 3 * 64
    # Tensor parallel ranks of one group read the same rows: 8 ranks at tp 2 are 4 data-parallel ranks.
    sharded = RunPlan(seq_len=64, micro_batch_size=4, accumulation=3, data_parallel=8 // 2, max_steps=10)
    assert sharded.tokens_per_step == 4 * 3 * 4 * 64


def test_max_tokens_sets_the_steps(tmp_path):
    plan = plan_run(training_args(tmp_path), PretrainingArguments(max_tokens=10_000), seq_len=64)
    assert plan.max_steps == 14  # ceil(10,000 / 768)
    assert plan.step_micro_batches is None


def test_a_batch_ramp_grows_the_step_and_keeps_the_budget(tmp_path):
    run = PretrainingArguments(max_tokens=20_000, batch_size_warmup_tokens=5_000, batch_size_warmup_start_tokens=256)
    plan = plan_run(training_args(tmp_path), run, seq_len=64)
    micro = 4 * 64
    assert plan.step_micro_batches[0] == 1 and plan.step_micro_batches[-2] == 3
    assert list(plan.step_micro_batches) == sorted(plan.step_micro_batches[:-1]) + [plan.step_micro_batches[-1]]
    assert plan.max_steps == len(plan.step_micro_batches)
    assert plan.step_tokens(1) == micro and plan.step_tokens(plan.max_steps + 5) == plan.step_tokens(plan.max_steps)
    assert plan.total_tokens == micro * sum(plan.step_micro_batches) >= 20_000
    assert plan.tokens_after(3) == micro * sum(plan.step_micro_batches[:3])


@pytest.mark.parametrize(("overrides", "run", "message"), [
    ({"gradient_accumulation_steps": 1}, {"batch_size_warmup_tokens": 1000},
     "batch_size_warmup_tokens: the batch grows by gradient accumulation"),
    ({}, {"batch_size_warmup_tokens": 1000, "batch_size_warmup_start_tokens": 10_000},
     "batch_size_warmup_start_tokens: 10,000 tokens is more than the full batch (768 tokens per step)"),
    ({}, {"batch_size_warmup_tokens": 1_000_000}, "batch_size_warmup_tokens: 1,000,000 tokens is not shorter"),
])
def test_impossible_plans_are_one_line_naming_the_key(tmp_path, overrides, run, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_run(training_args(tmp_path, **overrides), PretrainingArguments(**run), seq_len=64)


def test_a_stream_needs_a_length(tmp_path):
    with pytest.raises(ConfigError, match="max_steps: a streaming run needs max_steps"):
        plan_run(training_args(tmp_path, max_steps=-1), PretrainingArguments(), seq_len=64, streaming=True)
    assert plan_run(training_args(tmp_path, max_steps=-1), PretrainingArguments(max_tokens=768), seq_len=64,
                    streaming=True).max_steps == 1


def test_a_setting_is_one_line_but_a_failure_in_training_keeps_its_traceback(tmp_path, capsys):
    @recipe_main
    def bad_setting() -> int:
        raise ConfigError("max_length: must be > 0, got 0")

    assert bad_setting() == 2
    assert capsys.readouterr().err.strip() == "error: max_length: must be > 0, got 0"

    args = training_args(tmp_path)

    @recipe_main
    def failing_training() -> int:
        def train(resume):
            raise ValueError("a bug in a training step")
        return train_and_finish(args, "test", train=train, finish=lambda result: 0)

    with pytest.raises(ValueError, match="a bug in a training step"):
        failing_training()
    # The shell held the output folder's lock through training and let it go.
    assert train_and_finish(args, "test", train=lambda resume: resume, finish=lambda result: 7) == 7


def test_the_shell_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys):
    args = training_args(tmp_path, resume_from_checkpoint="auto")
    seen = []
    assert train_and_finish(args, "test", train=seen.append, finish=lambda result: 0) == 0
    assert seen == [None]
    assert "[test] no checkpoint in" in capsys.readouterr().out
    busy = training_args(tmp_path)
    with output_dir_lock(busy.output_dir):  # another run holds the folder
        assert train_and_finish(busy, "test", train=seen.append, finish=lambda result: 0) == 2
    assert capsys.readouterr().err.startswith("error: output_dir: ")
    assert seen == [None]  # refused before training


def test_probe_times_the_runs_own_optimizer():
    """The plan's probe steps the optimizer the run will use: Muon's Newton-Schulz iterations show in its time."""
    config = EmberConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    adamw = probe_step_seconds(config, 1, 16, OptimizerArguments(optimizer="adamw"), steps=3)
    muon = probe_step_seconds(config, 1, 16, OptimizerArguments(optimizer="muon", muon_ns_steps=60), steps=3)
    assert 0 < adamw < muon


def test_kept_memory_serves_the_next_large_block_without_page_faults():
    # In a fresh process (the setting is the process's): a 64 MB tensor made and freed 20 times, as a step's logits
    # are. glibc's default returns it to the kernel each time, so each one faults in its 15,625 pages again.
    code = """
import resource, sys, torch
from training.run import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # the first blocks come from the kernel either way, until the heap has room for one
    torch.empty(16_000_000).fill_(1.0)
before = faults()
for _ in range(20):
    torch.empty(16_000_000).fill_(1.0)
print(faults() - before)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    default, kept = (int(subprocess.run([sys.executable, "-c", code, arm], cwd=REPO_ROOT, env=env, check=True,
                                        capture_output=True, text=True).stdout.split()[-1])
                     for arm in ("default", "kept"))
    assert kept * 10 < default  # fewer than two blocks' worth (fewer pages under transparent huge pages, both arms)
