"""recipes/eval_downstream.py: lm-eval on a saved tiny checkpoint, offline, with the local tasks in
tests/data/lm_eval_tasks (a multiple-choice task and a rolling log-likelihood task)."""

import json
import math

import pytest
from conftest import REPO_ROOT, tiny_model

from data_prep.documents import read_documents
from data_prep.tokenizer import load_tokenizer
from evaluation.perplexity import evaluate_perplexity
from recipes import eval_downstream as recipe

TASKS = REPO_ROOT / "tests" / "data" / "lm_eval_tasks"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    model = tiny_model(vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def run(checkpoint_dir, output, *extra: str) -> dict:
    assert recipe.main([f"--model={checkpoint_dir}", f"--include_path={TASKS}",
                        "--tasks=ember_python_mc,ember_python_text", "--device=cpu", f"--output={output}",
                        *extra]) == 0
    return json.loads(output.read_text())


def test_local_tasks_run_offline_and_rolling_bpb_matches_perplexity_eval(checkpoint, tmp_path, capsys):
    path, model, tokenizer = checkpoint
    report = run(path, tmp_path / "all.json", "--batch_size=4")
    mc, text = report["results"]["ember_python_mc"], report["results"]["ember_python_text"]
    assert {"acc,none", "acc_norm,none", "acc_stderr,none"} <= mc.keys()
    assert 0 <= mc["acc,none"] <= 1 and (mc["acc,none"] * 8) == pytest.approx(round(mc["acc,none"] * 8))  # 8 questions
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= text.keys()
    assert report["model"] == str(path) and report["tasks"] == ["ember_python_mc", "ember_python_text"]

    # HFLM's context defaults to max_position_embeddings, in disjoint windows: window == stride == 256.
    ours = evaluate_perplexity(model, tokenizer, read_documents(TASKS / "python_text.jsonl"), stride=256,
                               progress=False)
    assert ours.window == model.config.max_position_embeddings == 256
    assert text["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-4)
    assert text["byte_perplexity,none"] == pytest.approx(2 ** ours.bits_per_byte, rel=1e-4)
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0] == "| Tasks | Version | Filter | n-shot | Metric |  | Value |  | Stderr |"
    version, shots = report["versions"]["ember_python_mc"], report["n-shot"]["ember_python_mc"]
    assert (f"| ember_python_mc | {version} | none | {shots} | acc | ↑ | {mc['acc,none']:.4f} | ± | "
            f"{mc['acc_stderr,none']:.4f} |") in table
    assert any(line.startswith("| ember_python_text |") and "| bits_per_byte | ↓ |" in line for line in table)
    assert "INFO" not in captured.out + captured.err


def test_limit_and_max_length(checkpoint, tmp_path):
    path, model, tokenizer = checkpoint
    report = run(path, tmp_path / "limited.json", "--limit=4", "--max_length=16", "--batch_size=3")
    text = report["results"]["ember_python_text"]
    assert report["results"]["ember_python_mc"]["sample_len"] == text["sample_len"] == 4
    ours = evaluate_perplexity(model, tokenizer, read_documents(TASKS / "python_text.jsonl"), window=16, stride=16,
                               max_documents=4, progress=False)
    assert text["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-4)
    assert math.isfinite(text["word_perplexity,none"])


def test_bad_arguments_are_one_line_errors(checkpoint, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks

    class LocalOnlyTaskManager(lm_eval.tasks.TaskManager):
        # An unknown name is looked up in lm-eval's whole registry too; indexing its thousands of YAML files
        # takes long on a small CPU, so this test leaves the registry out.
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnlyTaskManager)
    path, _, _ = checkpoint
    cases = [
        ([f"--model={path}", f"--include_path={TASKS}", "--tasks=ember_python_mcq"],
         "error: tasks: unknown task 'ember_python_mcq'"),
        ([f"--model={path}", f"--include_path={tmp_path / 'none'}", "--tasks=x"],
         f"error: include_path: {tmp_path / 'none'} is not a folder"),
        ([f"--model={tmp_path}", f"--include_path={TASKS}", "--tasks=ember_python_mc"],
         f"error: {tmp_path}: not a model directory"),
        ([f"--model={path}", "--tasks=ember_python_mc", "--batch_size=0"],
         "error: batch_size: '0' is not a positive integer"),
        ([f"--model={path}", "--tasks=ember_python_mc", "--limit=lots"],
         "error: limit: expected a number, got 'lots'"),
    ]
    for argv, message in cases:
        assert recipe.main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(message)
