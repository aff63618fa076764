"""Recovering a run: `--resume_from_checkpoint=auto` passes over a checkpoint with a cut-short file and names it, a
named broken checkpoint is a one-line error, a full disk while saving is a one-line error that keeps the previous
checkpoint, a second run on a busy `output_dir` is refused, and the ranks of a SIGKILLed launcher end with it."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import CPU_DDP, NANO_CPU, PRETRAIN_RECIPE, REPO_ROOT, SMALL_MODEL, recipe_error
from test_pretrain_resume import is_training_log
from transformers import TrainingArguments

from cli import ConfigError
from data_prep.token_dataset import PackedDataset
from modeling import EmberConfig, EmberForCausalLM
from training.checkpoints import (
    checkpoint_problem,
    latest_complete_checkpoint,
    output_dir_lock,
    resolve_resume,
    save_failure,
)
from training.trainer import PretrainingTrainer, collate_packed

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}


def recipe_command(data_dir: Path, output_dir: Path, *extra: str, ranks: int = 1) -> list[str]:
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP)] if ranks == 2
              else [sys.executable])
    return [*launch, str(PRETRAIN_RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}",
            f"--output_dir={output_dir}", SMALL_MODEL, "--eval_strategy=no", "--per_device_train_batch_size=2",
            "--logging_steps=1", "--warmup_steps=1", "--disable_tqdm=true", *extra]


def run_recipe(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory) -> Path:
    """A finished in-process run with checkpoint-2 and checkpoint-4 (tiny model, 4 steps)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train_tiny(data_dir, out, max_steps=4)
    return out


def train_tiny(data_dir: Path, out: Path, max_steps: int, resume: str | None = None) -> PretrainingTrainer:
    torch.manual_seed(0)
    model = EmberForCausalLM._from_config(EmberConfig.from_preset(
        "nano", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, save_steps=2,
                             logging_steps=1, use_cpu=True, report_to="none", seed=0, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = PretrainingTrainer(model=model, args=args, data_collator=collate_packed,
                                 train_dataset=PackedDataset(data_dir / "tokens" / "train", return_position_ids=True))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_auto_resume_passes_over_a_checkpoint_with_a_truncated_file(two_checkpoints, tmp_path, capsys, name):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    assert checkpoint_problem(out / "checkpoint-4") is None
    cut_short(out / "checkpoint-4" / name)
    problem = checkpoint_problem(out / "checkpoint-4")
    assert problem.startswith(str(out / "checkpoint-4" / name)) and "truncated" in problem

    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [f"warning: not resuming from checkpoint-4: {problem}"]
    with pytest.raises(ConfigError) as err:  # named explicitly: one line naming the file, no fallback
        resolve_resume(str(out / "checkpoint-4"), out)
    assert str(err.value) == f"resume_from_checkpoint: {problem}"


def test_the_fallback_checkpoint_resumes(two_checkpoints, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    cut_short(out / "checkpoint-4" / "optimizer.pt")
    resume = resolve_resume("auto", out)
    trainer = train_tiny(data_dir, out, max_steps=4, resume=resume)
    assert trainer.state.global_step == 4
    resumed = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    original = json.loads((two_checkpoints / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert resumed == [e["loss"] for e in original if "loss" in e]  # steps 3-4 retrained to the same losses
    assert checkpoint_problem(out / "checkpoint-4") is None  # rewritten whole


def test_other_damage_is_named(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    checkpoint = out / "checkpoint-4"
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert checkpoint_problem(checkpoint) == f"{checkpoint / 'trainer_state.json'}: records step 2, not 4"
    shutil.copytree(two_checkpoints / "checkpoint-4", checkpoint, dirs_exist_ok=True)
    (checkpoint / "optimizer.pt").write_bytes(b"")
    assert "not a complete torch archive" in checkpoint_problem(checkpoint)
    assert checkpoint_problem(out / "checkpoint-9") == f"{out / 'checkpoint-9'}: not a folder"


def test_recipe_names_a_broken_checkpoint_in_one_line(two_checkpoints, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    cut_short(out / "checkpoint-4" / "model.safetensors")
    result = run_recipe(*recipe_command(data_dir, out, "--max_steps=6", f"--resume_from_checkpoint={out}/checkpoint-4"))
    assert result.returncode == 2
    line = recipe_error(result.stderr)
    assert line.startswith(f"error: resume_from_checkpoint: {out}/checkpoint-4/model.safetensors: ")
    assert "truncated" in line


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """The output folder on a real 2.5 MiB tmpfs (in a private mount namespace): checkpoint-2 (about 1.6 MiB)
    fits, checkpoint-4 does not."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("this system does not allow a private mount namespace (unshare -rm), so no small disk to fill")
    out, kept = tmp_path / "small_disk", tmp_path / "after"
    out.mkdir()
    kept.mkdir()
    command = " ".join(f"'{part}'" for part in recipe_command(data_dir, out, "--max_steps=6", "--save_steps=2",
                                                               "--save_total_limit=3"))
    script = f"mount -t tmpfs -o size=2560k tmpfs '{out}' && {command}; rc=$?; cp -a '{out}/.' '{kept}/'; exit $rc"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO_ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    line = recipe_error(result.stderr)
    assert line.startswith(f"error: output_dir: no space left on the device of {out} while saving checkpoint-4: "
                           "a checkpoint needs about "), line
    assert line.endswith("is free; checkpoint-2 is kept"), line
    assert "Traceback" not in result.stderr
    assert checkpoint_problem(kept / "checkpoint-2") is None
    assert not (kept / "checkpoint-4").exists()  # the part-written folder is gone


def test_save_failure_recognises_only_a_full_disk(tmp_path):
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    assert save_failure(RuntimeError("shape mismatch"), tmp_path, folder, 100) is None
    assert folder.is_dir()
    error = save_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                         tmp_path, folder, 3 * 2**20)
    assert "no space left" in str(error) and "needs about 3.0 MiB" in str(error) and not folder.exists()


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    with output_dir_lock(tmp_path):
        probe = subprocess.run([sys.executable, "-c", "from training.checkpoints import output_dir_lock\n"
                                f"with output_dir_lock({str(tmp_path)!r}): pass"], capture_output=True, text=True,
                               cwd=REPO_ROOT)
        assert probe.returncode != 0
        assert f"output_dir: {tmp_path} is in use by another run (host " in probe.stderr
        assert f"pid {os.getpid()}," in probe.stderr
    with output_dir_lock(tmp_path):  # released on exit
        pass


def test_killed_launcher_takes_its_ranks_along_and_a_second_run_is_refused_meanwhile(data_dir, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen(recipe_command(data_dir, out, "--max_steps=100000", "--save_steps=50", ranks=2),
                                cwd=REPO_ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for line in launcher.stdout:
            if is_training_log(line):
                break
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len([p for p in ranks if "pretrain.py" in " ".join(p.cmdline())]) == 2

        second = run_recipe(*recipe_command(data_dir, out, "--max_steps=3"))
        assert second.returncode == 2
        line = recipe_error(second.stderr)
        assert line.startswith(f"error: output_dir: {out} is in use by another run (host "), line

        os.killpg(launcher.pid, signal.SIGKILL)  # what `kill -9 -PGID` does: the ranks are in sessions of their own
        launcher.wait(timeout=60)
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, [p.pid for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        launcher.stdout.close()
    deadline = time.monotonic() + 30
    while True:  # the lock went with the ranks
        try:
            with output_dir_lock(out):
                break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


RANK_ENDS = """
import atexit, os, sys, threading, time
import torch, torch.distributed as dist
from training.checkpoints import as_launched_rank, exit_rank

# Exit handlers run last-registered first: this one, registered before, sees what the recipe's handler left.
atexit.register(lambda: print("group still up at exit:", dist.is_initialized()))
as_launched_rank()
as_launched_rank()  # a recipe's main() may run more than once in one process (the quickstart runs several)
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()


class Finalized:
    def __del__(self, write=os.write):  # `os` itself may already be cleared when this runs
        write(1, b"finalized\\n")


FINALIZED = Finalized()  # a module global: deleted only when the interpreter finalizes


def late_writer():  # a non-daemon thread still writing when main() returns
    time.sleep(0.5)
    with open(sys.argv[2], "w") as handle:
        handle.write("written")


threading.Thread(target=late_writer).start()
print("trained")  # block-buffered on a pipe: exit_rank must flush it
exit_rank(3)
"""


@pytest.mark.parametrize("launched", [True, False], ids=["launched", "plain"])
def test_a_launched_rank_ends_after_its_exit_work_without_interpreter_finalization(tmp_path, launched):
    """A rank that trained under DDP on gloo can abort (SIGABRT) while the interpreter finalizes, after its work
    is done: DDP keeps the gloo backend and its threads alive past `destroy_process_group`. `exit_rank` ends a
    launched rank with its code after everything a normal exit does for its outputs (non-daemon threads joined,
    exit handlers run, the group left, output flushed), without finalization. A plain run exits normally."""
    env = {**ENV, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    written = tmp_path / "written.txt"
    result = subprocess.run([sys.executable, "-c", RANK_ENDS, str(tmp_path / "store"), str(written)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert written.read_text() == "written"
    expected = ["trained", "group still up at exit: False"] + ([] if launched else ["finalized"])
    assert result.stdout.splitlines() == expected, result.stdout
