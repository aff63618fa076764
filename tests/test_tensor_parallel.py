"""Tensor parallelism in recipes/pretrain.py (`tp_size`) on CPU ranks over gloo: the model's base_model_tp_plan
through transformers' DistributedConfig, the Trainer handing accelerate the matching ParallelismConfig. Tensor
parallel 2 on 2 ranks, and tensor parallel 2 x data parallel 2 (FSDP2) on 4 ranks, log the losses and gradient
norms of the plain data-parallel run within float tolerance.

accelerate accepts a ParallelismConfig only on accelerator-device ranks (or under FSDP2 / DeepSpeed launch
files): on CPU ranks it refuses it before looking at the model. The launched ranks therefore get
tests/cpu_sharding_shim/ on PYTHONPATH with EMBER_TEST_CPU_SHARDING=tp, which skips that one check for
MULTI_CPU ranks; the sharded model, the device mesh and the data-parallel batches take their real paths.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch_failure

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CPU_DDP = REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"
SHIM_DIR = Path(__file__).resolve().parent / "cpu_sharding_shim"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"
STEPS = 6
RUN_ARGS = (SMALL_MODEL, f"--max_steps={STEPS}", "--save_steps=3", "--logging_steps=1", "--eval_strategy=no",
            "--warmup_steps=1", "--disable_tqdm=true", "--dataloader_num_workers=0", "--save_only_model=true")
GLOBAL_BATCH = 4


def launch(data_dir: Path, output_dir: Path, processes: int, tp_size: int) -> str:
    per_device = GLOBAL_BATCH // (processes // tp_size)  # the same 4 rows per step in every layout
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--num_processes", str(processes), str(RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}",
               f"--output_dir={output_dir}", *RUN_ARGS, f"--per_device_train_batch_size={per_device}",
               f"--tp_size={tp_size}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "EMBER_TEST_CPU_SHARDING": "tp", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, launch_failure(result)
    return result.stdout


def logged(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [{k: e[k] for k in ("step", "loss", "grad_norm", "learning_rate")} for e in state["log_history"]
            if "loss" in e]


@pytest.fixture(scope="module")
def data_parallel(data_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dp") / "run"
    launch(data_dir, out, processes=2, tp_size=1)
    return logged(out)


@pytest.mark.parametrize("processes", [2, 4], ids=["tp2", "tp2xdp2"])
def test_tensor_parallel_training_matches_data_parallel(data_dir, data_parallel, tmp_path, processes):
    out = tmp_path / "run"
    stdout = launch(data_dir, out, processes=processes, tp_size=2)
    # 2 layers x 7 projections split over the tensor-parallel ranks, plus lm_head; with FSDP2 every weight.
    line = next(line for line in stdout.splitlines() if "tensor parallel" in line)
    sharded = int(line.split(": ")[1].split()[0])
    assert f"tensor parallel 2 x data parallel {processes // 2}" in line and sharded >= 14, line
    steps = logged(out)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for mine, reference in zip(steps, data_parallel):
        assert mine["learning_rate"] == reference["learning_rate"]
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5), mine["step"]
        assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), mine["step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "model.safetensors").exists()  # the final model is whole again


@pytest.mark.parametrize("extra,message", [
    (["--tp_size=3"], "error: tp_size: 3 does not divide num_attention_heads (4)"),
    (["--tp_size=2", "--save_only_model=false"], "error: tp_size: the Trainer cannot checkpoint the optimizer state"),
])
def test_tensor_parallel_settings_are_checked_with_one_line(data_dir, tmp_path, extra, message):
    result = subprocess.run([sys.executable, str(RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}",
                             f"--output_dir={tmp_path / 'run'}", *RUN_ARGS, *extra], cwd=REPO_ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
