"""Tests for modeling/sizing.py: exact parameter counts, FLOP formulas, memory model, device table, CLI."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling import PRESETS, EmberConfig, EmberForCausalLM
from modeling.sizing import (
    active_parameters,
    count_parameters,
    flops_per_token,
    format_duration,
    main,
    memory_per_gpu,
    parameter_breakdown,
    peak_flops_for_device,
    training_flops,
    training_flops_6nd,
    training_time,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
)


def actual_numel(config: EmberConfig) -> int:
    # The meta device allocates nothing, so even the 7b preset builds instantly.
    with torch.device("meta"):
        model = EmberForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_count_matches_model_for_every_preset(preset):
    config = EmberConfig.from_preset(preset)
    assert count_parameters(config) == actual_numel(config)


def test_published_counts():
    assert count_parameters(EmberConfig.from_preset("gpt2-124m")) == 124_439_808  # GPT-2 small
    assert count_parameters(EmberConfig.from_preset("7b")) == 6_738_415_616  # LLaMA-2-7B
    assert count_parameters(EmberConfig.from_preset("1b")) == 1_100_048_384  # TinyLlama-1.1B


SWITCHES = dict(
    num_key_value_heads=[4, 2, 1],  # MHA, GQA, MQA
    head_dim=[None, 12],
    tie_word_embeddings=[False, True],
    num_local_experts=[0, 3],
    attention_bias=[False, True],
    mlp_bias=[False, True],
    norm_type=["rmsnorm", "layernorm"],
    norm_placement=["pre", "post", "sandwich", "deepnorm"],
    qk_norm=[False, True],
    mlp_type=["swiglu", "gelu", "geglu", "relu"],
    position_embedding_type=["rope", "learned", "sinusoidal", "alibi", "relative"],
)


def switch_grid() -> list[dict]:
    """Each switch alone, everything at once (GPT-2 style and MoE style), and a fixed random sample."""
    combos = [{key: value} for key, values in SWITCHES.items() for value in values[1:]]
    combos += [
        dict(num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
             norm_type="layernorm", mlp_type="gelu", position_embedding_type="learned"),
        dict(num_key_value_heads=2, head_dim=12, num_local_experts=3, attention_bias=True,
             norm_type="layernorm", position_embedding_type="learned"),
    ]
    product = [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())]
    combos += random.Random(0).sample(product, 60)
    # The config rejects MoE with a plain MLP or MLP biases (experts are bias-free gated MLPs).
    moe_conflict = lambda c: c.get("num_local_experts") and (c.get("mlp_type") in ("gelu", "relu") or c.get("mlp_bias"))
    return [c for c in combos if not moe_conflict(c)]


@pytest.mark.parametrize("overrides", switch_grid(), ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_count_matches_model_for_switches(overrides):
    config = EmberConfig(**{**TINY, "num_experts_per_tok": 2, **overrides})
    assert count_parameters(config) == actual_numel(config)


def test_breakdown_matches_modules():
    config = EmberConfig.from_preset("gpt2-124m")
    breakdown = parameter_breakdown(config)
    model = EmberForCausalLM(EmberConfig(**{**TINY, **{k: getattr(config, k) for k in (
        "position_embedding_type", "norm_type", "mlp_type", "attention_bias", "mlp_bias", "tie_word_embeddings")}}))
    tiny = parameter_breakdown(model.config)
    assert breakdown["positions"] == 1024 * 768 and breakdown["lm_head"] == 0
    assert tiny["embedding"] == model.model.embed_tokens.weight.numel()
    assert tiny["positions"] == model.model.embed_positions.weight.numel()
    assert tiny["attention"] == sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    assert tiny["mlp"] == sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())


# Hand-computed: V=100, H=16, I=32, L=2, 4 query heads and 2 kv heads of width 4, T=8.
# Per layer: q 16·16 + k 16·8 + v 16·8 + o 16·16 = 768; SwiGLU 3·16·32 = 1536; two RMSNorms 32.
# N = 2·(768 + 1536 + 32) + final norm 16 + lm_head 100·16 = 6288; attention 12·2·4·4·8 = 3072.
HAND = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_by_hand(tied):
    config = EmberConfig(**HAND, tie_word_embeddings=tied)
    assert flops_per_token(config, seq_len=8) == 6 * 6288 + 3072  # lm_head counts even when tied


def test_flops_per_token_ignores_position_table():
    config = EmberConfig(**HAND, position_embedding_type="learned")
    assert flops_per_token(config, seq_len=8) == 6 * 6288 + 3072


def test_flops_per_token_moe_counts_active_experts():
    # 4 experts, top-2: router 4·16 + 2 active experts · 1536 replaces the dense MLP's 1536.
    config = EmberConfig(**HAND, num_local_experts=4, num_experts_per_tok=2)
    n_active = 2 * (768 + 4 * 16 + 2 * 1536 + 32) + 16 + 1600
    assert flops_per_token(config, seq_len=8) == 6 * n_active + 3072
    assert active_parameters(config) == n_active + 1600  # plus the input embedding
    assert count_parameters(config) == active_parameters(config) + 2 * 2 * 1536


def test_training_flops():
    config = EmberConfig(**HAND)
    plain = training_flops(config, tokens=1e6, seq_len=8)
    assert plain == 1e6 * flops_per_token(config, 8)
    assert training_flops(config, 1e6, 8, activation_recompute=True) / plain == pytest.approx(8 / 6)
    assert training_flops_6nd(config, 1e6) == 6 * count_parameters(config) * 1e6
    assert training_flops_6nd(config, 1e6, activation_recompute=True) == 8 * count_parameters(config) * 1e6


def test_training_time_and_format():
    config = EmberConfig.from_preset("1b")
    seconds = training_time(config, 2e10, num_gpus=8, peak_flops_per_gpu=989e12, mfu=0.4, seq_len=2048)
    assert seconds == pytest.approx(training_flops(config, 2e10, 2048) / (8 * 989e12 * 0.4))
    assert format_duration(42) == "42s"
    assert format_duration(750) == "12m 30s"
    assert format_duration(3 * 86400 + 4 * 3600 + 5 * 60) == "3d 4h 05m"


def test_memory_model_state():
    config = EmberConfig.from_preset("350m")
    n = count_parameters(config)
    kwargs = dict(micro_batch_size=2, seq_len=512)
    ddp = memory_per_gpu(config, 8, "ddp", **kwargs)
    assert ddp["params"] + ddp["grads"] + ddp["optimizer"] == 16 * n
    totals = [memory_per_gpu(config, 8, s, **kwargs)["total"] for s in ("ddp", "zero1", "zero2", "zero3")]
    assert totals[0] > totals[1] > totals[2] > totals[3]
    assert memory_per_gpu(config, 8, "zero3", **kwargs)["params"] == 2 * n / 8
    single = {memory_per_gpu(config, 1, s, **kwargs)["total"] for s in ("ddp", "zero1", "zero2", "zero3")}
    assert len(single) == 1
    fp32 = memory_per_gpu(config, 1, "ddp", param_bytes=4, **kwargs)
    assert fp32["params"] + fp32["grads"] + fp32["optimizer"] == 16 * n  # no master copy in fp32


def test_memory_activations():
    config = EmberConfig.from_preset("nano")  # h=256, a=8, L=6, V=8192
    s, b, h, a = 1024, 4, 256, 8
    full = memory_per_gpu(config, 1, micro_batch_size=b, seq_len=s)
    assert full["activations"] == 6 * s * b * h * (34 + 5 * a * s / h)
    assert full["logits"] == b * s * 8192 * 4
    flash = memory_per_gpu(config, 1, micro_batch_size=b, seq_len=s, flash_attention=True)
    assert flash["activations"] == 6 * s * b * h * 34
    ckpt = memory_per_gpu(config, 1, micro_batch_size=b, seq_len=s, activation_checkpointing=True)
    assert ckpt["activations"] == 6 * 2 * s * b * h
    assert ckpt["total"] < flash["total"] < full["total"]
    with pytest.raises(ValueError, match="strategy"):
        memory_per_gpu(config, 1, "fsdp")


@pytest.mark.parametrize(("name", "expected"), [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", None),  # not the A10: its peak is not in the table
    ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA L40S", None),
    ("Tesla T4", None),
])
def test_peak_flops_for_device(name, expected):
    assert peak_flops_for_device(name) == expected


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling.sizing", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_json():
    result = run_cli("--preset=nano", "--json", "--num_gpus=4", "--model_overrides.tie_word_embeddings=false")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    config = EmberConfig.from_preset("nano", tie_word_embeddings=False)
    assert report["parameters"] == count_parameters(config)
    assert set(report["memory_bytes"]) == {"ddp", "zero1", "zero2", "zero3"}
    assert report["training_seconds"] > 0


def test_cli_text():
    result = run_cli("--preset=gpt2-124m", "--tokens=1e9", "--gpu=A100")
    assert result.returncode == 0, result.stderr
    assert "124,439,808" in result.stdout and "zero3" in result.stdout


def test_cli_bad_preset():
    result = run_cli("--preset=bogus")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [
        "error: preset: unknown name 'bogus'; choose one of " + str(sorted(PRESETS))
    ]


def test_cli_old_spelling_still_works_with_deprecation_lines():
    result = run_cli("--preset", "nano", "--json", "--num-gpus", "4", "--override", "tie_word_embeddings=False")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parameters"] == count_parameters(
        EmberConfig.from_preset("nano", tie_word_embeddings=False))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "warning: --num-gpus is deprecated, write --num_gpus" in warnings
    assert "warning: --override tie_word_embeddings=False is deprecated, write " \
           "--model_overrides.tie_word_embeddings=False" in warnings


@pytest.mark.parametrize("override,message", [
    ("--model_overrides.hidden_size", "--model_overrides.hidden_size: overrides are written --key=value"),
    ("--model_overrides=3", "model_overrides: expected a mapping"),
    ("--model_overrides.no_such_field=1", "model_overrides.no_such_field: unknown EmberConfig field"),
    ("--model_overrides.hidden_size=abc", "model_overrides: Validation error for field 'hidden_size'"),
    ("--model_overrides.num_key_value_heads=3", "model_overrides: "),
    ("--num_gpus=0", "num_gpus: must be positive"),
    ("--mfu=1.5", "mfu: must be in (0, 1]"),
])
def test_cli_bad_override(override, message, capsys):
    assert main(["--preset=nano", override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors
