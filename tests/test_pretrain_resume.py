"""Exact resume of recipes/pretrain.py: after a hard kill (SIGKILL) and `--resume_from_checkpoint=auto`, every
later logged loss equals the uninterrupted run's bit for bit (CPU, same world size), the resumed run skips the
data it had consumed by index without reading it, and a checkpoint cut short by the kill is passed over."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from data_prep.token_dataset import PackedDataset
from modeling import EmberConfig, EmberForCausalLM
from training.checkpoints import latest_complete_checkpoint
from training.trainer import PretrainingTrainer, collate_packed

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CPU_DDP = REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"
MAX_STEPS, SAVE_STEPS = 40, 4  # a step takes tens of milliseconds: the launch, not the steps, sets the runtime
# checkpoint-4 is complete once step 5 is logged. The kill lands wherever the run has got to by the time
# the test has read that line (often a few steps on), so plenty of steps must be left.
KILL_AFTER_STEP = 5
RUN_ARGS = (SMALL_MODEL, f"--max_steps={MAX_STEPS}", f"--save_steps={SAVE_STEPS}", "--warmup_steps=2",
            "--logging_steps=1", "--eval_strategy=no", "--per_device_train_batch_size=2",
            "--gradient_accumulation_steps=1", "--dataloader_num_workers=0", "--disable_tqdm=true")
# What must match bit for bit; throughput and timing metrics naturally differ between runs.
COMPARED = ("step", "epoch", "loss", "grad_norm", "learning_rate")


def start_ddp_run(data_dir: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    """recipes/pretrain.py on 2 CPU ranks; stdout (rank 0's log lines, unbuffered) is piped line by line."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP), str(RECIPE),
               "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}", *RUN_ARGS, *extra]
    # Bitwise equality needs the same number of threads per rank in both runs, not one thread (two match
    # as well); one thread per rank, what accelerate picks on a 2-core machine, keeps the 2 ranks from
    # crowding a small machine and the runs alike on any machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    with open(stderr_file(output_dir), "w") as stderr:  # the launcher writes to its own copy of the file
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr)


def stderr_file(output_dir: Path) -> Path:
    return output_dir.parent / f"{output_dir.name}.stderr"


def finish(process: subprocess.Popen, output_dir: Path) -> list[str]:
    """Wait for a run; return its stdout lines, failing with its stderr if it did not succeed."""
    stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, stderr_file(output_dir).read_text()[-3000:]
    return stdout.splitlines()


def is_training_log(line: str) -> bool:
    """A periodic training log as the recipe prints it: `step 3/8 | loss 5.123 | ...`."""
    return line.startswith("step ") and "| loss " in line


def training_log_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if is_training_log(line)]


def logged_loss(line: str) -> float:
    """The loss of a training log line (printed to 4 significant digits)."""
    return float(next(part for part in line.split(" | ") if part.startswith("loss "))[len("loss "):])


def hard_kill(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it.

    The ranks run in sessions of their own (torch's elastic agent starts them with start_new_session), so a
    signal to the launcher's process group would miss them: kill each descendant by its pid, ranks first.
    """
    descendants = psutil.Process(process.pid).children(recursive=True)
    for proc in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone
            proc.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)  # the launcher is our child: reap it here, so its status is ours to read
    psutil.wait_procs(descendants, timeout=60)


def logged_history(output_dir: Path, step: int) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [{key: entry.get(key) for key in COMPARED} for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(start_ddp_run(data_dir, out), out)
    return out


def test_killed_run_resumes_bitwise_and_skips_a_half_written_checkpoint(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    process = start_ddp_run(data_dir, out)
    steps_logged = 0
    for line in process.stdout:
        steps_logged += is_training_log(line)
        if steps_logged == KILL_AFTER_STEP:
            hard_kill(process)
            break
    else:
        process.wait(timeout=60)
    process.stdout.close()
    assert steps_logged == KILL_AFTER_STEP, stderr_file(out).read_text()[-3000:]
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # killed before the end

    resumed_from = latest_complete_checkpoint(out)
    assert resumed_from is not None
    resume_step = int(Path(resumed_from).name.split("-")[1])
    assert KILL_AFTER_STEP // SAVE_STEPS * SAVE_STEPS <= resume_step < MAX_STEPS  # complete at the kill, or later

    # A kill while the next checkpoint was being written: the Trainer writes into checkpoint-N in place,
    # model files first and trainer_state.json last, so the folder holds weights and no trainer state.
    partial = out / f"checkpoint-{resume_step + SAVE_STEPS}"
    partial.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy2(Path(resumed_from) / name, partial / name)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    assert get_last_checkpoint(str(out)) == str(partial)  # a resume by folder name alone would pick it

    lines = finish(start_ddp_run(data_dir, out, "--resume_from_checkpoint=auto"), out)
    # The resumed run trained the steps after resume_step only (a restart at step 0 would log all of them) ...
    assert len(training_log_lines(lines)) == MAX_STEPS - resume_step
    # ... and every logged loss, gradient norm and learning rate equals the uninterrupted run's exactly.
    expected = logged_history(reference, MAX_STEPS)
    assert [entry["step"] for entry in expected] == list(range(1, MAX_STEPS + 1))
    assert logged_history(out, MAX_STEPS) == expected


class ReadCountingDataset(PackedDataset):
    """A PackedDataset that records the index of every block it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.reads.append(int(index))
        return super().__getitem__(index)


def train_in_process(data_dir: Path, output_dir: Path, max_steps: int, resume: str | None = None) -> list[int]:
    """The recipe's wiring (PackedDataset, collate_packed, PretrainingTrainer) in one process; returns the reads."""
    dataset = ReadCountingDataset(data_dir / "tokens" / "train", return_position_ids=True)
    torch.manual_seed(0)
    model = EmberForCausalLM._from_config(EmberConfig.from_preset(
        "nano", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             save_steps=SAVE_STEPS, logging_steps=1, use_cpu=True, report_to="none", seed=0,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_packed)
    trainer.train(resume_from_checkpoint=resume)
    return dataset.reads


def test_resume_skips_consumed_blocks_by_index_without_reading_them(data_dir, tmp_path):
    """The map-style PackedDataset under the Trainer's default sampler: on resume the sampler's indices of the
    consumed batches are dropped (accelerate's skip_first_batches), so no consumed block is read again."""
    out = tmp_path / "run"
    full = train_in_process(data_dir, out, max_steps=2 * SAVE_STEPS)
    # Each step reads its batch of 2 blocks (accelerate's loader also reads one batch ahead), none twice.
    assert len(full) >= 2 * SAVE_STEPS * 2 and len(set(full)) == len(full)
    consumed_before_checkpoint, read_after_checkpoint = full[:SAVE_STEPS * 2], full[SAVE_STEPS * 2:]
    resumed = train_in_process(data_dir, out, max_steps=2 * SAVE_STEPS, resume=str(out / f"checkpoint-{SAVE_STEPS}"))
    assert resumed == read_after_checkpoint  # the same blocks in the same order, and nothing else
    assert not set(resumed) & set(consumed_before_checkpoint)


def write_checkpoint(output_dir: Path, step: int, trainer_state: str | None) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    if trainer_state is not None:
        (folder / "trainer_state.json").write_text(trainer_state)
    return folder


def test_latest_complete_checkpoint_passes_over_partial_ones(tmp_path):
    complete = write_checkpoint(tmp_path, 20, json.dumps({"global_step": 20, "log_history": []}))
    write_checkpoint(tmp_path, 40, None)  # killed before the trainer state was written
    write_checkpoint(tmp_path, 60, json.dumps({"global_step": 60, "log_history": []})[:25])  # killed mid-write
    write_checkpoint(tmp_path, 80, json.dumps({"global_step": 60}))  # a trainer state from another step
    (tmp_path / "checkpoint-100").write_text("a file, not a folder")
    (tmp_path / "checkpoint-final").mkdir()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-80")
    assert latest_complete_checkpoint(tmp_path) == str(complete)
    # Step numbers compare as numbers, not as text.
    newer = write_checkpoint(tmp_path, 1000, json.dumps({"global_step": 1000}))
    assert latest_complete_checkpoint(tmp_path) == str(newer)


def test_latest_complete_checkpoint_none_without_a_complete_one(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    assert latest_complete_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, 5, None)
    assert latest_complete_checkpoint(tmp_path) is None
