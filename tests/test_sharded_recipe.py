"""recipes/pretrain.py itself on 2 CPU ranks under accelerate_configs/fsdp2.yaml and accelerate_configs/zero3.yaml.

accelerate turns FSDP and DeepSpeed on only for accelerator devices; on CPU ranks both tiers would quietly run
as plain DDP. The launched ranks therefore get tests/cpu_sharding_shim/ on PYTHONPATH: its sitecustomize.py
switches their AcceleratorState to the FSDP or DeepSpeed plugin the launcher configured from the YAML, and
the unchanged recipe, Trainer and accelerate take their real sharded paths over gloo. Each test proves the
sharding from what the run leaves on disk (one checkpoint shard per rank, DeepSpeed's ZeRO-3 partitions),
checks that the final folder is one whole model that loads with `trust_remote_code` and equals the sharded
state of the last checkpoint, and the FSDP2 test resumes from a sharded checkpoint with the same losses, bit
for bit.

This file is also the script of a probe run in a process of its own (bottom of the file): it reads the ZeRO
partition files with DeepSpeed's tools, so the test process never imports DeepSpeed.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import launch_failure
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoModelForCausalLM

from data_prep.token_dataset import PackedDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CONFIG_DIR = REPO_ROOT / "accelerate_configs"
SHIM_DIR = Path(__file__).resolve().parent / "cpu_sharding_shim"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"
MAX_STEPS, SAVE_STEPS = 6, 3
# One warmup step: the learning rate is at its peak from step 2, so six steps visibly lower the loss.
RUN_ARGS = (SMALL_MODEL, f"--max_steps={MAX_STEPS}", f"--save_steps={SAVE_STEPS}", "--logging_steps=1",
            "--eval_strategy=no", "--per_device_train_batch_size=2", "--bf16=false", "--warmup_steps=1",
            "--disable_tqdm=true")
# What a resumed run must reproduce bit for bit; throughput and timing naturally differ between runs.
COMPARED = ("step", "loss", "grad_norm", "learning_rate")


def launch_recipe(tier: str, sharding: str, data_dir: Path, output_dir: Path, *extra: str) -> str:
    """recipes/pretrain.py under `accelerate launch --config_file accelerate_configs/<tier>` on 2 CPU ranks, with
    the shim switching the ranks to `sharding` ("fsdp" or "deepspeed"); returns rank 0's stdout."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / tier),
               # The two overrides a 2-core machine needs: 2 ranks, fp32 (CPU autocast would change the numbers).
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
               str(RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}",
               *RUN_ARGS, *extra]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",  # accelerate's multi-process launcher does not pass use_cpu on to the ranks
        "EMBER_TEST_CPU_SHARDING": sharding,
        # DeepSpeed on CPU: its communication wraps the gloo group accelerate set up, plus a shared-memory op
        # it compiles on first use and caches under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # one thread per rank: the 2 ranks share 2 cores
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    # From the repository root: zero3.yaml names its DeepSpeed JSON relative to the launch directory.
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, launch_failure(result)
    return result.stdout


def logged_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [{key: entry[key] for key in COMPARED} for entry in state["log_history"] if "loss" in entry]


def check_training_and_final_model(output_dir: Path, data_dir: Path) -> dict[str, torch.Tensor]:
    """Losses finite and falling; the output folder is one whole model that loads with trust_remote_code and
    gives finite logits. Returns its weights."""
    losses = [entry["loss"] for entry in logged_steps(output_dir)]
    assert len(losses) == MAX_STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.05, losses

    config = json.loads((output_dir / "config.json").read_text())
    # The model code travels with the weights (and nothing of the sharding library's does).
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ember.EmberForCausalLM"
    assert sorted(path.name for path in output_dir.glob("*.py")) == ["configuration_ember.py", "modeling_ember.py"]
    assert not list(output_dir.glob("*.index.json")), "one file holds the whole model"

    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    assert type(model).__name__ == "EmberForCausalLM"
    rows = PackedDataset(data_dir / "tokens" / "validation")
    input_ids = torch.stack([rows[i]["input_ids"] for i in range(2)])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (*input_ids.shape, config["vocab_size"]) and logits.isfinite().all()
    return load_file(output_dir / "model.safetensors")


def test_fsdp2_tier_trains_the_recipe_sharded_and_resumes_exactly(data_dir, tmp_path):
    out = tmp_path / "run"
    launch_recipe("fsdp2.yaml", "fsdp", data_dir, out)

    # SHARDED_STATE_DICT checkpoints: each rank wrote its own part of the weights and of AdamW's state
    # (torch.distributed.checkpoint, one .distcp file per rank), and no rank gathered a whole model.
    for step in (SAVE_STEPS, MAX_STEPS):
        checkpoint = out / f"checkpoint-{step}"
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (checkpoint / folder).iterdir()) == [".metadata", "__0_0.distcp",
                                                                                "__1_0.distcp"], folder
        assert not (checkpoint / "model.safetensors").exists()
    # fully_shard's Shard(0): every parameter was saved as two row blocks, one per rank.
    checkpoint = out / f"checkpoint-{MAX_STEPS}" / "pytorch_model_fsdp_0"
    saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert saved
    for name, tensor in saved.items():
        assert isinstance(tensor, TensorStorageMetadata), name
        rows, half = tensor.size[0], math.ceil(tensor.size[0] / 2)
        assert sorted((chunk.offsets[0], chunk.sizes[0]) for chunk in tensor.chunks) == [(0, half),
                                                                                           (half, rows - half)], name

    # The final folder is FULL_STATE_DICT: the whole model, equal to the sharded state of the last checkpoint.
    final = check_training_and_final_model(out, data_dir)
    dcp_to_torch_save(checkpoint, tmp_path / "checkpoint_weights.pt")
    sharded = torch.load(tmp_path / "checkpoint_weights.pt")["model"]
    assert sorted(final) == sorted(sharded)
    for name, tensor in final.items():
        assert torch.equal(tensor, sharded[name]), name

    # Resume on the same 2 ranks from the sharded checkpoint-3, alone in a fresh output folder.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", resumed / f"checkpoint-{SAVE_STEPS}")
    launch_recipe("fsdp2.yaml", "fsdp", data_dir, resumed, "--resume_from_checkpoint=auto")
    assert [entry["step"] for entry in logged_steps(resumed)] == list(range(1, MAX_STEPS + 1))
    assert logged_steps(resumed)[SAVE_STEPS:] == logged_steps(out)[SAVE_STEPS:]  # bitwise: floats compared with ==
    resumed_final = load_file(resumed / "model.safetensors")
    for name, tensor in final.items():
        assert torch.equal(resumed_final[name], tensor), name


def test_zero3_tier_trains_the_recipe_partitioned(data_dir, tmp_path):
    out = tmp_path / "run"
    stdout = launch_recipe("zero3.yaml", "deepspeed", data_dir, out)

    # DeepSpeed checkpoints: per-rank ZeRO partition files of the weights and the optimizer state.
    for step in (SAVE_STEPS, MAX_STEPS):
        partitions = out / f"checkpoint-{step}" / f"global_step{step}"
        assert sorted(p.name for p in partitions.iterdir()) == [
            f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")]
    probe = tmp_path / "partitions.pt"
    result = subprocess.run([sys.executable, __file__, "zero-partitions", str(out / f"checkpoint-{MAX_STEPS}"),
                             str(probe)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, launch_failure(result)
    partitions = torch.load(probe)
    final = check_training_and_final_model(out, data_dir)
    parameters = sum(tensor.numel() for tensor in final.values())
    # Stage 3 over 2 ranks: each holds about half of the fp32 master weights (plus alignment padding).
    assert [(rank["zero_stage"], rank["partition_count"]) for rank in partitions["ranks"]] == [(3, 2), (3, 2)]
    for rank in partitions["ranks"]:
        assert parameters / 2 <= rank["fp32_elements"] < parameters
    # The model was built already partitioned (zero3_init_flag); the recipe still reports its full size.
    assert f"] {parameters:,} parameters |" in stdout

    # stage3_gather_16bit_weights_on_model_save: the final folder holds the whole model, and it is the one the
    # partitions make up.
    consolidated = partitions["state_dict"]
    assert set(final) <= set(consolidated)
    for name, tensor in final.items():
        assert torch.equal(tensor, consolidated[name]), name


# ---- the probe, run in its own process: python tests/test_sharded_recipe.py zero-partitions <checkpoint> <out> ----


def probe_zero_partitions(checkpoint: Path, out_file: Path) -> None:
    """Each rank's ZeRO stage, partition count and fp32 elements, and the whole fp32 model rebuilt from the
    partitions by DeepSpeed's own zero_to_fp32, saved to `out_file`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ranks = []
    for path in sorted(checkpoint.glob("global_step*/zero_pp_rank_*_optim_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        ranks.append({"zero_stage": int(state["zero_stage"]), "partition_count": int(state["partition_count"]),
                      "fp32_elements": sum(group.numel() for group in state["fp32_flat_groups"])})
    torch.save({"ranks": ranks, "state_dict": get_fp32_state_dict_from_zero_checkpoint(checkpoint)}, out_file)


if __name__ == "__main__":
    if sys.argv[1:2] != ["zero-partitions"] or len(sys.argv) != 4:
        sys.exit("usage: test_sharded_recipe.py zero-partitions <checkpoint> <out_file>")
    probe_zero_partitions(Path(sys.argv[2]), Path(sys.argv[3]))
