"""lm-eval tasks during pretraining (`downstream_tasks`): scored on rank 0 every N steps and at the last, logged
with the other metrics (the Trainer's own logs intact), plotted in the run report, and equal to what the
evaluation command gives for the final weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_error

from evaluation.downstream import build_task_manager, evaluate_downstream
from modeling.loading import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = REPO_ROOT / "tests" / "data" / "lm_eval_tasks"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def pretrain(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "pretrain.py"), "--config",
         str(REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"), f"--data_dir={data_dir}",
         f"--output_dir={out}", "--max_steps=6", "--warmup_steps=2", "--logging_steps=2", "--eval_steps=3",
         "--save_strategy=no", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
         "--model_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
         "num_key_value_heads: 1}", *extra], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream") / "run"
    result = pretrain(data_dir, out, "--downstream_tasks=[ember_python_mc, ember_python_text]",
                      f"--downstream_include_path=[{TASKS}]", "--downstream_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_scores_are_logged_every_n_steps_and_at_the_end(run):
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    scored = [entry for entry in history if "downstream_seconds" in entry]
    assert [entry["step"] for entry in scored] == [4, 6]
    for entry in scored:
        assert 0 <= entry["downstream/ember_python_mc/acc"] <= 1 and entry["downstream_seconds"] > 0
        assert entry["downstream/ember_python_text/bits_per_byte"] > 0
    # The Trainer's own training logs and evaluations are all still there.
    assert [entry["step"] for entry in history if "loss" in entry] == [2, 4, 6]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [3, 6]
    report = (run / "run_report" / "report.md").read_text()
    for metric in ("acc", "bits_per_byte"):
        assert (run / "run_report" / f"downstream_{metric}.png").stat().st_size > 1000
        assert f"(downstream_{metric}.png)" in report


def test_the_last_scores_are_the_final_models(run):
    model, tokenizer = load_checkpoint(run, device="cpu")
    tasks = ["ember_python_mc", "ember_python_text"]
    results = evaluate_downstream(model.eval(), tokenizer, tasks, build_task_manager(tasks, [str(TASKS)]),
                                  max_length=model.config.max_position_embeddings)
    last = [entry for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]
            if "downstream_seconds" in entry][-1]
    assert last["downstream/ember_python_mc/acc"] == pytest.approx(results["results"]["ember_python_mc"]["acc,none"])
    assert last["downstream/ember_python_text/bits_per_byte"] == pytest.approx(
        results["results"]["ember_python_text"]["bits_per_byte,none"], rel=1e-6)


def test_an_unknown_task_is_a_one_line_error_before_training(data_dir, tmp_path):
    result = pretrain(data_dir, tmp_path / "run", "--downstream_tasks=[no_such_task]",
                      f"--downstream_include_path=[{TASKS}]", "--downstream_steps=2")
    assert result.returncode == 2
    assert recipe_error(result.stderr).startswith("error: downstream_tasks: unknown task 'no_such_task'")
    assert not (tmp_path / "run" / "trainer_state.json").exists()
    result = pretrain(data_dir, tmp_path / "run", "--downstream_tasks=[ember_python_mc]")
    assert recipe_error(result.stderr).startswith("error: downstream_steps: set how often")
