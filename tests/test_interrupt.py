"""Ctrl-C in a terminal: the first one lets the running step finish, saves a checkpoint of it and ends the run
with one line naming that checkpoint (no traceback); the resumed run trains on exactly as an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import SMALL_RUN, STDLIB_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
MAX_STEPS = 60


def as_a_terminal_job() -> None:
    """In the child before exec: SIGINT does what it does for a job started from a terminal. A shell that starts
    the tests in the background hands every child an ignored SIGINT, which Python then keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pretrain_command(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "recipes" / "pretrain.py"), "--config",
            str(REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"), f"--data_dir={data_dir}",
            f"--output_dir={out}", f"--max_steps={MAX_STEPS}", "--save_steps=1000", "--warmup_steps=2",
            "--logging_steps=1", "--eval_strategy=no", "--per_device_train_batch_size=2",
            "--gradient_accumulation_steps=1", "--dataloader_num_workers=0",
            "--model_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
            "num_key_value_heads: 1}", *extra]


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def test_ctrl_c_saves_the_step_and_the_run_resumes_exactly(data_dir, tmp_path):
    reference = subprocess.run(pretrain_command(data_dir, tmp_path / "whole"), capture_output=True, text=True,
                               cwd=REPO_ROOT, env=ENV, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    process = subprocess.Popen(pretrain_command(data_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO_ROOT, env=ENV, preexec_fn=as_a_terminal_job)
    for line in process.stdout:  # Ctrl-C once training is under way (the terminal sends SIGINT)
        if line.startswith("step 5/"):
            process.send_signal(signal.SIGINT)
            break
    process.stdout.read()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by Ctrl-C: newest checkpoint (\S+) \(step (\d+)\); the same command with "
                         r"--resume_from_checkpoint=auto resumes from it", last)
    assert match, stderr[-2000:]
    step = int(match.group(2))
    assert 5 <= step < MAX_STEPS and Path(match.group(1)) == out / f"checkpoint-{step}"
    assert not (out / "model.safetensors").exists()  # the run did not finish

    resumed = subprocess.run(pretrain_command(data_dir, out, "--resume_from_checkpoint=auto"), capture_output=True,
                             text=True, cwd=REPO_ROOT, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'} (step {step})" in resumed.stdout
    assert losses(out) == losses(tmp_path / "whole")


def test_ctrl_c_in_a_data_run_ends_in_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "data_prep", "run", "--config", str(STDLIB_CONFIG),
                                f"--output_dir={tmp_path / 'data'}", *SMALL_RUN, "--workers=2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=ENV,
                               start_new_session=True,  # its own process group, as a terminal's job is
                               preexec_fn=as_a_terminal_job)
    for line in process.stdout:
        if line.startswith("[data_prep] filter"):
            os.killpg(process.pid, signal.SIGINT)  # the terminal signals the whole group: workers too
            break
    process.stdout.read()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("stopped by Ctrl-C: finished shards and steps are kept; the same "
                                               "command goes on from there")
    finished = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(STDLIB_CONFIG),
                               f"--output_dir={tmp_path / 'data'}", *SMALL_RUN, "--workers=2"],
                              capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (tmp_path / "data" / "report.txt").is_file()
