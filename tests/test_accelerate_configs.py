"""accelerate_configs/: every file loads the way `accelerate launch` loads it, and the CPU tiers really run.

The GPU tiers cannot run here, so they are checked one layer down: the environment `accelerate launch` would
hand to the ranks is rebuilt with accelerate's own launcher functions and fed to the FSDP / DeepSpeed
plugins, exactly as the ranks would build them. Two tiers are launched for real on 2 CPU ranks over gloo:
cpu_ddp.yaml, and fsdp2.yaml through a small test-only shim (`shard_with_fsdp_on_cpu`), because accelerate
turns FSDP on only for accelerator devices and drops the plugin silently on CPU ranks.

This file is also the rank script of those launches: `accelerate launch ... tests/test_accelerate_configs.py
<worker> <out_dir>` runs one of the `run_*_worker` functions on every rank (see the bottom of the file).
"""

import argparse
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.run as torchrun
from accelerate import Accelerator, PartialState
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import _filter_args, prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from conftest import launch_failure, tiny_model
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor

from training.checkpoints import as_launched_rank, exit_rank

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "accelerate_configs"

# What each tier must say once accelerate has loaded it (ClusterConfig attribute -> value).
EXPECTED = {
    "cpu_ddp.yaml": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=2, num_machines=1,
                         mixed_precision="no", use_cpu=True),
    "single_gpu.yaml": dict(distributed_type=DistributedType.NO, num_processes=1, num_machines=1,
                            mixed_precision="bf16", use_cpu=False),
    "multi_gpu_ddp.yaml": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=8, num_machines=1,
                               mixed_precision="bf16", use_cpu=False),
    "fsdp2.yaml": dict(distributed_type=DistributedType.FSDP, num_processes=8, num_machines=1,
                       mixed_precision="bf16", use_cpu=False),
    "multi_node_fsdp2.yaml": dict(distributed_type=DistributedType.FSDP, num_processes=16, num_machines=2,
                                  mixed_precision="bf16", use_cpu=False, rdzv_backend="static", same_network=True),
    "tp_multi_gpu.yaml": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=8, num_machines=1,
                              mixed_precision="bf16", use_cpu=False),
    "multi_node_cpu_ddp.yaml": dict(distributed_type=DistributedType.MULTI_GPU, num_processes=2, num_machines=2,
                                    mixed_precision="no", use_cpu=True, rdzv_backend="static", same_network=True),
    # DeepSpeed tiers take bf16 from the JSON ("auto" = the recipe's `bf16`), so they set no mixed_precision.
    "zero2.yaml": dict(distributed_type=DistributedType.DEEPSPEED, num_processes=8, num_machines=1,
                       mixed_precision=None, use_cpu=False),
    "zero3.yaml": dict(distributed_type=DistributedType.DEEPSPEED, num_processes=8, num_machines=1,
                       mixed_precision=None, use_cpu=False),
    "zero3_offload.yaml": dict(distributed_type=DistributedType.DEEPSPEED, num_processes=8, num_machines=1,
                               mixed_precision=None, use_cpu=False),
}
FSDP_TIERS = ["fsdp2.yaml", "multi_node_fsdp2.yaml"]
# DeepSpeed tier -> (JSON file, ZeRO stage, offload device for optimizer state and parameters)
DEEPSPEED_TIERS = {
    "zero2.yaml": ("ds_zero2.json", 2, "none"),
    "zero3.yaml": ("ds_zero3.json", 3, "none"),
    "zero3_offload.yaml": ("ds_zero3_offload.json", 3, "cpu"),
}
BATCH_SIZE_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# The FSDP2 run: 4 rows of random tokens, 2 per rank, a few optimizer steps.
ROWS, SEQ_LEN, STEPS = 4, 16, 4


def launcher_env(config: str, *options: str) -> tuple[argparse.Namespace, dict[str, str]]:
    """The parsed launch arguments and the ACCELERATE_* / FSDP_* variables `accelerate launch` would export."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIG_DIR / config), *options, "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before the DeepSpeed launcher
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_precision_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


def trainer_filled_deepspeed_keys() -> set[str]:
    """DeepSpeed config keys whose "auto" the installed transformers' Trainer replaces, read from its source
    (its config class cannot be built without deepspeed installed)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    return set(re.findall(r'fill_(?:match|only)\(\s*"([^"]+)"', inspect.getsource(HfTrainerDeepSpeedConfig)))


def auto_keys(config: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every "auto" value in a DeepSpeed config."""
    found = set()
    for key, value in config.items():
        if isinstance(value, dict):
            found |= auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.add(prefix + key)
    return found


# ---- every file loads, and says what its tier needs ----


def test_every_tier_is_checked_and_documented():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)
    readme = (CONFIG_DIR / "README.md").read_text(encoding="utf-8")
    for name in [*EXPECTED, *(json_file for json_file, _, _ in DEEPSPEED_TIERS.values())]:
        assert name in readme, f"README.md does not mention {name}"


@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_config_loads_with_accelerate(config: str):
    path = CONFIG_DIR / config
    assert path.read_text(encoding="utf-8").startswith("# Tier: "), "each file opens with its hardware tier"
    loaded = load_config_from_file(str(path))
    for field, expected in EXPECTED[config].items():
        assert getattr(loaded, field) == expected, field
    # Sections a tier does not use stay empty: a stray fsdp_config on a DeepSpeed tier is silently ignored.
    assert bool(loaded.fsdp_config) == (config in FSDP_TIERS)
    assert bool(loaded.deepspeed_config) == (config in DEEPSPEED_TIERS)


@pytest.mark.parametrize("config", [*FSDP_TIERS, *DEEPSPEED_TIERS])
def test_plugin_keys_are_launch_options(config: str):
    """accelerate copies fsdp_config / deepspeed_config keys onto its CLI arguments without checking them,
    so a misspelt key would be ignored without a word."""
    loaded = load_config_from_file(str(CONFIG_DIR / config))
    options = launch_command_parser()._option_string_actions
    for key in [*loaded.fsdp_config, *loaded.deepspeed_config]:
        assert f"--{key}" in options, f"{config}: {key} is not an `accelerate launch` option"


@pytest.mark.parametrize("config", FSDP_TIERS)
def test_fsdp2_plugin_as_the_ranks_build_it(config: str, monkeypatch):
    _, env = launcher_env(config, "--main_process_port", "0")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False
    # No class named in the file: the wrap classes come from the model's `_no_split_modules`.
    assert plugin.transformer_cls_names_to_wrap is None
    model = tiny_model()
    plugin.set_auto_wrap_policy(model)
    assert plugin.transformer_cls_names_to_wrap == ["EmberDecoderLayer"]
    wrapped = [name for name, module in model.named_modules() if plugin.auto_wrap_policy(module, False, 0)]
    assert wrapped == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]


def test_multi_node_fields_reach_torchrun(monkeypatch):
    """The fields left to the user (machine_rank, main_process_ip) come from the command line, and torchrun,
    which accelerate hands the launch to, gets a static rendezvous at main_process_ip:main_process_port."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's config_from_args would otherwise set it for us
    args, _ = launcher_env("multi_node_fsdp2.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    torchrun_args = _filter_args(args, torchrun.get_args_parser(),
                                 ["--training_script", args.training_script, "--training_script_args", []])
    launch, _, _ = torchrun.config_from_args(torchrun_args)
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (2, 2, 8)
    assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("static", "10.1.2.3:29500")
    assert launch.rdzv_configs["rank"] == 1


@pytest.mark.parametrize("config", sorted(DEEPSPEED_TIERS))
def test_deepspeed_plugin_as_the_ranks_build_it(config: str, monkeypatch, tmp_path):
    json_file, stage, offload = DEEPSPEED_TIERS[config]
    _, env = launcher_env(config)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"accelerate_configs/{json_file}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The JSON path is relative to the launch directory: it loads from the repository root...
    monkeypatch.chdir(REPO_ROOT)
    plugin = DeepSpeedPlugin()  # also rejects YAML keys that clash with the JSON (mixed_precision, zero_stage...)
    assert plugin.zero_stage == stage
    assert (plugin.offload_optimizer_device, plugin.offload_param_device) == (offload, offload)
    assert plugin.zero3_init_flag is (stage == 3)
    assert plugin.zero3_save_16bit_model is (stage == 3)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    # ...and not from elsewhere, as the files and README.md say.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="existing deepspeed config"):
        DeepSpeedPlugin()


@pytest.mark.parametrize("config", sorted(DEEPSPEED_TIERS))
def test_deepspeed_json(config: str):
    json_file, stage, offload = DEEPSPEED_TIERS[config]
    ds_config = json.loads((CONFIG_DIR / json_file).read_text(encoding="utf-8"))
    zero = ds_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == offload
    assert zero.get("offload_param", {}).get("device", "none") == offload
    if stage == 3:  # save_pretrained must write a whole model, not rank-local partitions
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for field in (*BATCH_SIZE_FIELDS, "gradient_clipping"):
        assert ds_config[field] == "auto", field
    assert ds_config["bf16"]["enabled"] == "auto"
    # DeepSpeed's CPU Adam needs its own optimizer section; on the GPU the Trainer's optimizer is kept.
    assert ("optimizer" in ds_config) == (offload == "cpu")
    assert "scheduler" not in ds_config, "the recipe's learning-rate schedule must stay in charge"
    fillable = trainer_filled_deepspeed_keys()
    assert {"train_micro_batch_size_per_gpu", "bf16.enabled"} <= fillable
    assert auto_keys(ds_config) <= fillable, "an 'auto' the Trainer does not fill would reach DeepSpeed as text"


# ---- the CPU tiers, launched for real on 2 gloo ranks ----


def accelerate_launch(config: str, worker: str, out_dir: Path, *options: str) -> None:
    """Run this file's `worker` on every rank with `accelerate launch --config_file accelerate_configs/<config>`."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",  # accelerate's multi-process launcher does not pass use_cpu on to the ranks
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / config),
               *options, __file__, worker, str(out_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, launch_failure(result)


def read_ranks(out_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]


def test_cpu_ddp_starts_two_gloo_ranks(tmp_path):
    accelerate_launch("cpu_ddp.yaml", "ddp", tmp_path)
    ranks = read_ranks(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["backend"] == "gloo"
        assert r["distributed_type"] == "MULTI_CPU"
        assert r["sum_of_ranks"] == 0 + 1  # the all-reduce crossed processes


def test_fsdp2_config_shards_tiny_model_on_two_cpu_ranks(tmp_path):
    """fsdp2.yaml as is, bar the two command-line overrides a 2-core machine needs (2 ranks, fp32 so the
    result can be compared with one process exactly): accelerate's own FSDP2 preparation shards a tiny Ember
    model, and training it matches the same steps taken by one process on the whole batch."""
    accelerate_launch("fsdp2.yaml", "fsdp2", tmp_path, "--num_processes", "2", "--mixed_precision", "no",
                      "--main_process_port", "0")
    ranks = read_ranks(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert (r["world_size"], r["backend"], r["distributed_type"]) == (2, "gloo", "FSDP")
        assert r["fsdp_version"] == 2
        assert r["root_sharded"] and r["layers_sharded"] == [True, True]  # one shard group per decoder layer
        for name, param in r["params"].items():
            assert param["dtensor"] and param["placements"] == ["Shard(dim=0)"], name
            assert param["local_rows"] == math.ceil(param["rows"] / 2), name
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"])

    # One process, whole batch, same model and optimizer.
    reference = tiny_model(seed=0).train()
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    optimizer = make_optimizer(reference)
    tokens = training_tokens()
    reference_losses = []
    for _ in range(STEPS):
        loss = reference(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())

    states = torch.load(tmp_path / "states.pt")
    # cpu_ram_efficient_loading: rank 1 built different weights, yet every shard holds rank 0's.
    for name, value in initial.items():
        torch.testing.assert_close(states["initial"][name], value, rtol=0, atol=0, msg=name)
    assert ranks[0]["losses"] == pytest.approx(reference_losses, rel=1e-5)
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
    for name, param in reference.named_parameters():
        torch.testing.assert_close(states["final"][name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)


# ---- rank-side code of the launches above ----


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: sharded optimizer state, and updates linear in the gradients, so a wrong gradient
    scale across ranks changes the result (Adam would normalise it away)."""
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def training_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def write_rank_record(out_dir: Path, accelerator: Accelerator, **record) -> None:
    record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
              "distributed_type": accelerator.distributed_type.value, **record}
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


def run_ddp_worker(out_dir: Path) -> None:
    accelerator = Accelerator()
    total = accelerator.reduce(torch.tensor([float(accelerator.process_index)]), reduction="sum")
    write_rank_record(out_dir, accelerator, sum_of_ranks=total.item())


def shard_with_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Test-only: turn on, on CPU ranks, the FSDP plugin that `accelerate launch` configured from the YAML.

    AcceleratorState switches a run to FSDP only when the ranks use accelerator devices (MULTI_GPU,
    MULTI_XPU, ...); on CPU ranks it stays MULTI_CPU and drops the plugin. Re-creating the plugin from the
    FSDP_* variables the launcher exported and marking the state FSDP lets `accelerator.prepare` run the real
    FSDP2 path (fully_shard per wrapped layer, rank-0 weight broadcast) on gloo.
    """
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, "expected CPU ranks"
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole (unsharded) parameters; a collective, so every rank calls it."""
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def run_fsdp2_worker(out_dir: Path) -> None:
    accelerator = Accelerator()
    shard_with_fsdp_on_cpu(accelerator)
    # Each rank starts from different weights; cpu_ram_efficient_loading must make rank 0's the ones trained.
    model = tiny_model(seed=accelerator.process_index).train()
    optimizer = make_optimizer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    initial = full_parameters(model)

    rows = training_tokens().chunk(accelerator.num_processes)[accelerator.process_index]
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    final = accelerator.get_state_dict(model)  # the whole model on rank 0, as a final save_pretrained gets it

    params = {
        name: {"dtensor": isinstance(p, DTensor), "placements": [repr(x) for x in getattr(p, "placements", [])],
               "rows": p.shape[0], "local_rows": p.to_local().shape[0] if isinstance(p, DTensor) else p.shape[0]}
        for name, p in model.named_parameters()
    }
    write_rank_record(
        out_dir, accelerator, fsdp_version=accelerator.state.fsdp_plugin.fsdp_version, losses=losses, params=params,
        root_sharded=isinstance(model, FSDPModule),
        layers_sharded=[isinstance(layer, FSDPModule) for layer in model.model.layers],
    )
    if accelerator.is_main_process:
        torch.save({"initial": initial, "final": final}, out_dir / "states.pt")


if __name__ == "__main__":  # rank entry point for the launches above: <worker> <out_dir>
    worker, out_dir = sys.argv[1], Path(sys.argv[2])
    as_launched_rank()  # as the recipes' ranks: out of the gloo group before the interpreter shuts down
    {"ddp": run_ddp_worker, "fsdp2": run_fsdp2_worker}[worker](out_dir)
    exit_rank(0)
