"""Loss-spike rollback on 2 CPU ranks. A long corrupted region (eight steps' worth of blocks read through a reversed
vocabulary, as text in the wrong encoding) makes the loss spike; the run rolls back to the last checkpoint, scores
the blocks since from its weights, skips exactly the bad ones (recorded in the checkpoint's data state and the run
report), ends within 2% of the clean run's validation loss, and a copy killed after the rollback and resumed
reproduces its losses bit for bit. A rise that clean data shares (the corpus moving on to other files) is a shift:
the run re-baselines and finishes."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import CPU_DDP, NANO_CPU, PRETRAIN_RECIPE, REPO_ROOT, SMALL_MODEL
from test_pretrain_resume import is_training_log, logged_loss, training_log_lines

# 2 ranks x 2 rows: step s reads blocks 4(s-1) .. 4s-1 in order. Blocks 88-119 (steps 23-30) are corrupted.
CORRUPT_BLOCKS, SPIKE_STEP = (88, 120), 23
MAX_STEPS, SAVE_STEPS = 36, 5
RUN_ARGS = (SMALL_MODEL, f"--max_steps={MAX_STEPS}", f"--save_steps={SAVE_STEPS}", "--save_total_limit=10",
            "--warmup_steps=2", "--logging_steps=1", "--eval_strategy=no", "--per_device_train_batch_size=2",
            "--train_sampling_strategy=sequential", "--disable_tqdm=true", "--loss_spike_zscore=5",
            "--loss_spike_window=10")
COMPARED = ("step", "epoch", "loss", "grad_norm", "learning_rate")


def corrupt_copy(data_dir: Path, out: Path, blocks: tuple[int, int]) -> Path:
    """`data_dir` with the tokens of blocks [first, last) of the training shards read through the reversed
    vocabulary (id -> vocab_size - 1 - id): real text's structure, every token the wrong one."""
    shutil.copytree(data_dir, out)
    (shard,) = [p for p in sorted((out / "tokens" / "train").glob("*.json")) if p.with_suffix(".bin").is_file()]
    metadata = json.loads(shard.read_text())
    tokens = np.memmap(shard.with_suffix(".bin"), dtype=np.dtype(metadata["dtype"]), mode="r+",
                       shape=(metadata["num_tokens"],))
    seq_len = metadata["seq_len"]
    # Block i is tokens [i x seq_len, (i + 1) x seq_len]: from the second token of `first` on, only bad blocks change.
    start, end = blocks[0] * seq_len + 1, blocks[1] * seq_len + 1
    tokens[start:end] = metadata["vocab_size"] - 1 - tokens[start:end]
    tokens.flush()
    return out


@pytest.fixture(scope="module")
def corrupted(data_dir, tmp_path_factory) -> Path:
    return corrupt_copy(data_dir, tmp_path_factory.mktemp("corrupt") / "data", CORRUPT_BLOCKS)


def start(data_dir: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP), str(PRETRAIN_RECIPE),
               "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}", *RUN_ARGS, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.parent / f"{output_dir.name}.stderr", "w") as stderr:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr,
                                start_new_session=True)


def finish(process: subprocess.Popen, output_dir: Path) -> list[str]:
    stdout, _ = process.communicate(timeout=900)
    assert process.returncode == 0, (output_dir.parent / f"{output_dir.name}.stderr").read_text()[-3000:]
    return stdout.splitlines()


def history(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [{key: entry.get(key) for key in COMPARED} for entry in state["log_history"] if "loss" in entry]


def test_a_long_bad_region_is_skipped_exactly_and_a_killed_rolled_back_run_resumes_exactly(data_dir, corrupted,
                                                                                           tmp_path):
    out = tmp_path / "on"
    lines = finish(start(corrupted, out), out)
    rollback = [line for line in lines if line.startswith("[pretrain] loss spike")]
    assert len(rollback) == 1, lines[-40:]
    assert rollback[0].startswith(f"[pretrain] loss spike at step {SPIKE_STEP} (loss ")
    assert "rolling back to checkpoint-20; scored the blocks of steps 21-" in rollback[0]
    assert rollback[0].endswith(": skipping the 32 blocks above it (88-119)"), rollback[0]
    logged = [logged_loss(line) for line in training_log_lines(lines)]
    spiked = logged[SPIKE_STEP - 1]  # printed before the rollback
    before = logged[SPIKE_STEP - 9:SPIKE_STEP - 1]
    assert spiked > max(before) + 0.5, (spiked, before)

    # The final history: steps 1-36 once each, the spike gone, no loss far above its neighbours.
    final = history(out)
    assert [entry["step"] for entry in final] == list(range(1, MAX_STEPS + 1))
    losses = [entry["loss"] for entry in final]
    assert max(losses[SPIKE_STEP - 3:]) < max(before) + 0.3, losses
    for step in (25, 30, 35):  # every later checkpoint records the skipped blocks
        state = json.loads((out / f"checkpoint-{step}" / "data_state.json").read_text())
        assert state["skipped_blocks"] == [[88, 120]]
        (event,) = state["rollbacks"]
        assert (event["spike_step"], event["resumed_from_step"], event["decision"]) == (SPIKE_STEP, 20, "skip")
        assert event["skipped_blocks"] == [[88, 120]] and event["anomalous_blocks"] == 32
    report = (out / "run_report" / "report.md").read_text()
    assert "## Loss spikes" in report and "| 1 | 23 |" in report and "32 bad blocks skipped | 88-119 |" in report

    # As good as never having met the bad region: within 2% of the clean run's validation loss.
    clean = tmp_path / "clean"
    finish(start(data_dir, clean), clean)
    recovered, reference = (json.loads((run / "all_results.json").read_text())["eval_loss"] for run in (out, clean))
    assert abs(recovered - reference) / reference < 0.02, (recovered, reference)

    # The same run, killed after the rollback once checkpoint-30 is written, then resumed: the same losses.
    killed = tmp_path / "killed"
    process = start(corrupted, killed)
    after_rollback = None
    for line in process.stdout:
        if line.startswith("[pretrain] loss spike"):
            after_rollback = 0
        elif after_rollback is not None and is_training_log(line):
            after_rollback += 1
            if after_rollback == 12:  # step 32 logged: checkpoint-30 is complete
                break
    for proc in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    process.kill()
    process.wait(timeout=60)
    process.stdout.close()
    assert after_rollback == 12
    assert not (killed / "model.safetensors").exists()
    assert json.loads((killed / "checkpoint-30" / "data_state.json").read_text())["skipped_blocks"] == [[88, 120]]
    resumed = finish(start(corrupted, killed, "--resume_from_checkpoint=auto"), killed)
    assert not any(line.startswith("[pretrain] loss spike") for line in resumed)  # the bad blocks stay skipped
    assert history(killed) == final  # bit for bit


def test_a_rise_the_fresh_data_shares_is_a_shift_and_the_run_goes_on(tmp_path):
    """Clean data whose loss rises where the corpus order moves on to other files: every rollback's screen finds
    the rise in the fresh blocks too, so nothing is skipped and the detector starts over; the run finishes."""
    from data_prep.config import load_config
    from data_prep.pipeline import run_pipeline

    data = tmp_path / "data"
    run_pipeline(load_config(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml", [
        f"--output_dir={data}", "--num_shards=1", "--sources.0.max_docs=60", "--tokenizer.vocab_size=512",
        "--pack.seq_len=64", "--validation_fraction=0.1"]))
    out = tmp_path / "run"
    process = start(data, out, "--max_steps=60", "--per_device_train_batch_size=4", "--save_steps=5",
                    "--save_total_limit=20", "--loss_spike_zscore=4", "--loss_spike_window=10")
    lines = finish(process, out)
    spikes = [line for line in lines if line.startswith("[pretrain] loss spike")]
    assert spikes, "no spike: the data no longer rises where this test expects it"
    assert all(", a shift in the data: nothing skipped" in line for line in spikes), spikes
    assert [entry["step"] for entry in history(out)] == list(range(1, 61))
    state = json.loads((out / "checkpoint-60" / "data_state.json").read_text())
    assert state["skipped_blocks"] == [] and {event["decision"] for event in state["rollbacks"]} == {"shift"}
    assert "): nothing skipped, spike test re-baselined" in (out / "run_report" / "report.md").read_text()
