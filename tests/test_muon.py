"""`optimizer: muon` (training/muon.py): which parameters Muon takes, that its step is torch's Muon step (per expert
for MoE), that AdamW's half is the Trainer's AdamW, the NaN guard's skipped steps, exact resume, gradient
accumulation, and the recipe on 2 CPU ranks under DDP and FSDP2."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NANO_CPU, PRETRAIN_RECIPE, REPO_ROOT, SMALL_MODEL, launch_failure, tiny_model
from safetensors.torch import load_file
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz
from transformers import TrainingArguments

from cli import ConfigError
from data_prep.token_dataset import PackedDataset
from recipes import pretrain as pretrain_recipe
from training.arguments import OptimizerArguments
from training.callbacks import NonFiniteGuardCallback
from training.muon import MuonWithAdamW, muon_parameter_groups, muon_parameter_names, orthogonalize
from training.optim import decay_parameter_names
from training.trainer import PretrainingTrainer, collate_packed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG_DIR = REPO_ROOT / "accelerate_configs"
SHIM_DIR = Path(__file__).resolve().parent / "cpu_sharding_shim"
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()  # untied head
    names = set(muon_parameter_names(model))
    block = {p: "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for p in HIDDEN}
    assert names == {f"model.layers.{i}.{block[p]}.{p}.weight" for i in range(2) for p in HIDDEN}
    groups = muon_parameter_groups(model, set(decay_parameter_names(model)), lr=1e-3, muon_lr=2e-2, weight_decay=0.1,
                                   momentum=0.95, nesterov=True, ns_steps=5, lr_scaling="match_rms_adamw")
    by_id = {id(p): name for name, p in model.named_parameters()}
    muon, decay, no_decay = ([by_id[id(p)] for p in group["params"]] for group in groups)
    assert set(muon) == names and groups[0]["muon"] and groups[0]["lr"] == 2e-2
    assert decay == ["lm_head.weight"] and groups[1]["weight_decay"] == 0.1  # untied head: AdamW with decay
    assert set(no_decay) == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")}
    assert groups[2]["weight_decay"] == 0.0
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))

    tied = tiny_model(tie_word_embeddings=True)  # the head is the embedding: AdamW, not Muon
    assert not any("lm_head" in name or "embed" in name for name in muon_parameter_names(tied))


def test_moe_experts_are_orthogonalised_one_expert_at_a_time_and_the_router_stays_with_adamw():
    model = tiny_model(num_local_experts=4, num_experts_per_tok=2)
    names = muon_parameter_names(model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.experts.down_proj" in names
    assert not any("mlp.gate.weight" in name for name in names)
    stack = torch.randn(4, 24, 16)
    together = orthogonalize(stack)
    for expert in range(4):
        assert torch.equal(together[expert], orthogonalize(stack[expert]))
    # Newton-Schulz gives a near-orthogonal matrix: singular values near 1 (torch's coefficients leave 0.5-1.5).
    singular = torch.linalg.svdvals(together[0])
    assert together.dtype == torch.float32 and singular.min() > 0.4 and singular.max() < 1.6


def test_a_muon_step_is_torch_muons_step_and_the_adamw_step_is_adamws():
    """On CPU the Newton-Schulz iteration runs in float32 instead of torch's bfloat16: the same steps up to
    bfloat16's rounding. Everything else (momentum, Nesterov, shape scaling, decoupled decay) is torch's."""
    torch.manual_seed(0)
    x = torch.randn(48, 16)
    ours = orthogonalize(x)
    theirs = _zeropower_via_newtonschulz(x, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS).float()
    assert ours.dtype == torch.float32 and (ours - theirs).abs().max() < 0.02 < ours.abs().max()

    hidden, head = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))
    reference = [p.detach().clone().requires_grad_() for p in (hidden, head)]
    muon = MuonWithAdamW([{"params": [hidden], "muon": True, "lr": 0.02, "weight_decay": 0.1, "momentum": 0.95,
                           "nesterov": True, "ns_steps": 5, "lr_scaling": "match_rms_adamw"},
                          {"params": [head], "lr": 1e-3, "weight_decay": 0.0}], betas=(0.9, 0.95), lr=1e-3)
    torch_muon = torch.optim.Muon([reference[0]], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                  adjust_lr_fn="match_rms_adamw")
    torch_adamw = torch.optim.AdamW([reference[1]], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    start = hidden.detach().clone()
    for _ in range(3):
        grads = torch.randn(32, 16), torch.randn(16)
        for p, g in zip((hidden, head, *reference), grads * 2):
            p.grad = g.clone()
        muon.step()
        torch_muon.step()
        torch_adamw.step()
    assert torch.equal(head, reference[1])  # AdamW's half is AdamW
    step_size = 0.02 * 0.2 * math.sqrt(32)  # match_rms_adamw: lr x 0.2 sqrt(max(m, n)) per orthogonal update
    assert (hidden - start).abs().max() > step_size * 0.1  # the weights moved by about a step per step ...
    assert (hidden - reference[0]).abs().max() < 3 * step_size * 0.02  # ... as torch's Muon moves them


def test_skipped_step_leaves_weights_and_state_alone_and_state_round_trips():
    model = tiny_model()
    groups = muon_parameter_groups(model, set(decay_parameter_names(model)), lr=1e-3, muon_lr=1e-3,
                                   weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                                   lr_scaling="match_rms_adamw")
    optimizer = MuonWithAdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    batch = torch.randint(0, 128, (2, 16))
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = json.dumps({k: str(v) for k, v in optimizer.state_dict()["state"].items()})
    # What NonFiniteGuardCallback does to a step with NaN gradients: every grad set to None.
    for p in model.parameters():
        p.grad = None
    optimizer.step()
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    assert json.dumps({k: str(v) for k, v in optimizer.state_dict()["state"].items()}) == state

    # state_dict -> load_state_dict into a fresh optimizer: the next step is the same.
    fresh_model = tiny_model().train()
    fresh_model.load_state_dict(model.state_dict())
    fresh = MuonWithAdamW(muon_parameter_groups(fresh_model, set(decay_parameter_names(fresh_model)), lr=1e-3,
                                                muon_lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                                                ns_steps=5, lr_scaling="match_rms_adamw"), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: no tensor shared
    for m, opt in ((model, optimizer), (fresh_model, fresh)):
        m.zero_grad()
        m(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), name


def trainer_for(data_dir: Path, out: Path, max_steps: int, batch: int = 2, accumulation: int = 1,
                **options) -> PretrainingTrainer:
    model = tiny_model(vocab_size=512, max_position_embeddings=64, seed=0)
    model.config.use_cache = False
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, save_steps=2, logging_steps=1, use_cpu=True,
                             report_to="none", seed=0, remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True, learning_rate=2e-3, train_sampling_strategy="sequential")
    return PretrainingTrainer(model=model, args=args, data_collator=collate_packed,
                              train_dataset=PackedDataset(data_dir / "tokens" / "train", return_position_ids=True),
                              optimizer_options=OptimizerArguments(optimizer="muon", **options),
                              callbacks=[NonFiniteGuardCallback()])


def losses(trainer: PretrainingTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_builds_muon_resumes_exactly_and_accumulates(data_dir, tmp_path):
    full = trainer_for(data_dir, tmp_path / "full", max_steps=4)
    full.train()
    assert isinstance(full.optimizer.optimizer, MuonWithAdamW)
    assert losses(full)[-1] < losses(full)[0]
    resumed = trainer_for(data_dir, tmp_path / "full", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert losses(resumed) == losses(full)  # steps 3-4 again, bit for bit: Muon's momentum came back
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)

    # The same 4 rows per step as one batch of 4 or as 2 accumulated batches of 2: the same gradient (its norm
    # shows the scale, which Muon's and Adam's normalised steps would hide) and the same update, up to rounding.
    one = trainer_for(data_dir, tmp_path / "one", max_steps=2, batch=4)
    two = trainer_for(data_dir, tmp_path / "two", max_steps=2, batch=2, accumulation=2)
    one.train()
    two.train()
    for a, b in zip(one.state.log_history[:2], two.state.log_history[:2]):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4) and math.isclose(a["loss"], b["loss"],
                                                                                           rel_tol=1e-5)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)  # a step moves weights by about 2e-3


def test_bad_optimizer_settings_are_one_line_errors():
    for override, message in (
            ({"optimizer": "sgd"}, "optimizer: unknown optimizer 'sgd'; choose one of adamw, muon"),
            ({"optimizer": "muon", "muon_momentum": 1.5}, "muon_momentum: must be in [0, 1), got 1.5"),
            ({"optimizer": "muon", "muon_lr_scaling": "big"},
             "muon_lr_scaling: must be one of match_rms_adamw, original, got 'big'")):
        with pytest.raises(ConfigError) as err:
            pretrain_recipe.parse([], config=NANO_CPU, overrides=override)
        assert str(err.value) == message


def launch(tier: str, data_dir: Path, output_dir: Path, *extra: str, sharding: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / tier),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", str(PRETRAIN_RECIPE),
               "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={output_dir}", SMALL_MODEL,
               "--optimizer=muon", "--max_steps=6", "--save_steps=3", "--logging_steps=1", "--eval_strategy=no",
               "--per_device_train_batch_size=2", "--warmup_steps=1", "--disable_tqdm=true", *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if sharding:
        env["EMBER_TEST_CPU_SHARDING"] = sharding
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_DIR), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def logged(output_dir: Path, step: int = 6) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [{k: e[k] for k in ("step", "loss", "grad_norm", "learning_rate")} for e in state["log_history"]
            if "loss" in e]


def test_muon_on_two_ranks_ddp_and_fsdp2_agree_and_fsdp2_resumes_exactly(data_dir, tmp_path):
    """Also the EMA under both: one ema_state.pt under DDP, one per rank under FSDP2, and a resumed FSDP2 run
    continues the same average."""
    ddp = launch("cpu_ddp.yaml", data_dir, tmp_path / "ddp", "--ema_decay=0.9")
    assert ddp.returncode == 0, launch_failure(ddp)
    fsdp = launch("fsdp2.yaml", data_dir, tmp_path / "fsdp", "--ema_decay=0.9", sharding="fsdp")
    assert fsdp.returncode == 0, launch_failure(fsdp)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-6").glob("ema_state*")) == ["ema_state.pt"]
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint-6").glob("ema_state*")) == [
        "ema_state_0.pt", "ema_state_1.pt"]
    ddp_ema, fsdp_ema = (load_file(tmp_path / run / "ema" / "model.safetensors") for run in ("ddp", "fsdp"))
    for run, ema in (("ddp", ddp_ema), ("fsdp", fsdp_ema)):  # saved like the final model (FSDP keeps tied keys)
        assert sorted(ema) == sorted(load_file(tmp_path / run / "model.safetensors")), run
    for name, tensor in ddp_ema.items():
        torch.testing.assert_close(fsdp_ema[name], tensor, rtol=0, atol=2e-3)  # the gathered shards: the same EMA
    # FSDP2 really sharded the matrices (one optimizer shard per rank) ...
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint-6" / "optimizer_0").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    # ... and Muon on gathered matrices follows the same path as Muon on whole ones under DDP.
    ddp_log, fsdp_log = logged(tmp_path / "ddp"), logged(tmp_path / "fsdp")
    assert [e["step"] for e in fsdp_log] == list(range(1, 7))
    assert fsdp_log[-1]["loss"] < fsdp_log[0]["loss"] - 0.05
    for a, b in zip(ddp_log, fsdp_log):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-3), (a, b)

    resumed = tmp_path / "fsdp_resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-3", resumed / "checkpoint-3")
    again = launch("fsdp2.yaml", data_dir, resumed, "--resume_from_checkpoint=auto", "--ema_decay=0.9",
                   sharding="fsdp")
    assert again.returncode == 0, launch_failure(again)
    assert logged(resumed)[3:] == fsdp_log[3:]  # bit for bit: the sharded momentum buffers came back
    resumed_ema = load_file(resumed / "ema" / "model.safetensors")
    assert all(torch.equal(resumed_ema[name], tensor) for name, tensor in fsdp_ema.items())


def test_muon_under_deepspeed_is_refused_in_one_line(data_dir, tmp_path):
    result = launch("zero3.yaml", data_dir, tmp_path / "zero3", sharding="deepspeed")
    assert result.returncode != 0
    # The launcher adds its own report of the failed ranks; the recipe's line is there once.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: optimizer: muon needs whole weight matrices, and DeepSpeed ZeRO flattens them into "
                      "partitions; use FSDP2 (accelerate_configs/fsdp2.yaml) or DDP"], result.stderr[-3000:]


def test_finetuning_with_muon_gives_lora_matrices_to_muon(tmp_path):
    from training.finetune import add_lora, finetuning_trainer, lora_config

    model = add_lora(tiny_model(), lora_config(tiny_model(), r=4))
    names = muon_parameter_names(model)
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert len(names) == len([n for n, p in model.named_parameters() if p.requires_grad])  # LoRA trains only these
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to="none")
    trainer = finetuning_trainer(model, args, None, None, None, optimizer_options=OptimizerArguments(optimizer="muon"))
    assert isinstance(trainer.create_optimizer(), MuonWithAdamW)
