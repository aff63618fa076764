"""Back-of-the-envelope sizing for Ember models: parameters, training FLOPs, wall-clock time, GPU memory.

Everything here is closed-form arithmetic on an `EmberConfig`; no model is built. The parameter count is
exact (the tests check it against `EmberForCausalLM(config).parameters()`); the FLOP, time and memory
figures are the standard estimates from the literature, with their assumptions stated where they are used.

Command line::

    python -m modeling.sizing --preset=1b --seq_len=2048 --tokens=2e10 --num_gpus=8 --gpu=H100 --mfu=0.4
    python -m modeling.sizing --preset=nano --model_overrides.num_local_experts=8 --json
"""

import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from cli import ConfigError, parse_args, report_error

from .configuration_ember import PRESETS, EmberConfig

# Dense (no 2:4 sparsity) BF16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s. The datasheets
# print the sparse figure first with "*"; these are half of it. Devices not listed (e.g. AWS's A10G, whose
# clocks differ from the A10's) get no MFU unless the peak is given explicitly. Longer names match first.
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,  # BF16 with FP32 accumulate
}

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"


def peak_flops_for_device(name: str) -> float | None:
    """Dense BF16 peak FLOP/s for a device name such as "NVIDIA H100 80GB HBM3", or None if unknown.

    Case-insensitive substring match against `PEAK_FLOPS`, longest key first ("H100 PCIe" before "H100"),
    where the key must not run into further letters or digits: "A10" matches neither "A100" nor "A10G",
    "L4" does not match "L40S".
    """
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", name.lower()):
            return PEAK_FLOPS[key]
    return None


def parameter_breakdown(config: EmberConfig) -> dict[str, int]:
    """Parameters per component, matching the modules `EmberForCausalLM` builds.

    The textbook count for a LLaMA block stack, 2VH + H + L(4H² + 3HH' + 2H) (V vocab, H width, H' MLP
    width, L layers), generalised to every Ember switch:

    - attention: q and o are H x (n_heads * head_dim), k and v are H x (n_kv_heads * head_dim) (GQA/MQA,
      head_dim need not be H / n_heads); with `attention_bias`, one bias per projection output;
    - mlp: gated MLPs (SwiGLU, GeGLU, ReGLU) have gate, up, down (3HH'), plain ones (GELU, ReLU, Swish)
      up, down (2HH'); `mlp_bias` adds output biases; MoE layers have a bias-free router (E x H) and E
      gated experts (E x 3HH') and no MLP biases;
    - norms: 2 per layer plus the final one for pre-norm, 4 per layer plus the final one for sandwich-norm,
      2 per layer and no final one for post-norm and DeepNorm; RMSNorm has a weight (H), LayerNorm weight
      and bias (2H); QK-norm adds two RMSNorm weights of head_dim per layer;
    - positions: "learned" has a table (max_position_embeddings x H), "relative" one bias per bucket and
      head shared by all layers; rope/alibi/sinusoidal have none;
    - lm_head: V x H, or 0 when tied to the input embedding (the shared matrix is counted once).
    """
    h, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    inter, head_dim = config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    attention = 2 * h * q_width + 2 * h * kv_width
    if config.attention_bias:
        attention += q_width + 2 * kv_width + h
    router = 0
    if config.is_moe:
        router = config.num_local_experts * h
        mlp = config.num_local_experts * 3 * h * inter
    else:
        n_mats = 3 if config.is_gated_mlp else 2
        mlp = n_mats * h * inter + (((n_mats - 1) * inter + h) if config.mlp_bias else 0)
    norm = 2 * h if config.norm_type == "layernorm" else h
    norms_per_layer, final_norms = {"pre": (2, 1), "sandwich": (4, 1)}.get(config.norm_placement, (2, 0))
    positions = 0
    if config.position_embedding_type == "learned":
        positions = config.max_position_embeddings * h
    elif config.position_embedding_type == "relative":
        positions = config.relative_attention_num_buckets * config.num_attention_heads

    return {
        "embedding": v * h,
        "positions": positions,
        "attention": n_layers * attention,
        "mlp": n_layers * mlp,
        "router": n_layers * router,
        "norms": (norms_per_layer * n_layers + final_norms) * norm + (2 * n_layers * head_dim if config.qk_norm else 0),
        "lm_head": 0 if config.tie_word_embeddings else v * h,
    }


def count_parameters(config: EmberConfig) -> int:
    """Total unique parameters, equal to `sum(p.numel() for p in EmberForCausalLM(config).parameters())`."""
    return sum(parameter_breakdown(config).values())


def active_parameters(config: EmberConfig) -> int:
    """Parameters a token passes through: for MoE only `num_experts_per_tok` of the experts count."""
    total = count_parameters(config)
    if config.is_moe:
        idle = config.num_local_experts - config.num_experts_per_tok
        total -= config.num_hidden_layers * idle * 3 * config.hidden_size * config.intermediate_size
    return total


def flops_per_token(config: EmberConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no recomputation): 6N + 12·L·n_heads·head_dim·T.

    This is the model-FLOPs formula of PaLM (Chowdhery et al. 2022, appendix B), the denominator of MFU.
    6N is Kaplan et al. 2020 ("Scaling Laws for Neural Language Models"): each weight costs a
    multiply-add (2 FLOPs) forward and twice that backward. N here excludes the input embedding and learned
    position tables (lookups, not matmuls) but includes lm_head, even when tied; for MoE it counts the
    router and only the `num_experts_per_tok` active experts. The second term is attention's QK^T and
    AV matmuls over a context of T = seq_len (counted in full, as PaLM does, without halving for the
    causal mask or shortening for a sliding window).
    """
    breakdown = parameter_breakdown(config)
    n = active_parameters(config) - breakdown["embedding"] - breakdown["positions"]
    n += config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return float(6 * n + attention)


def training_flops(config: EmberConfig, tokens: float, seq_len: int, activation_recompute: bool = False) -> float:
    """Total training FLOPs from `flops_per_token`: tokens x (6N + 12·L·n_heads·head_dim·T).

    With full activation recomputation every forward runs twice, so the factor 6 becomes 8 (2 forward +
    4 backward + 2 recomputed forward) on the whole expression: the result is scaled by 8/6. These are
    hardware FLOPs; MFU is defined on the value without recomputation.
    """
    return tokens * flops_per_token(config, seq_len) * (8 / 6 if activation_recompute else 1.0)


def training_flops_6nd(config: EmberConfig, tokens: float, activation_recompute: bool = False) -> float:
    """The coarse estimate C = 6·N·D (Kaplan et al. 2020; Hoffmann et al. 2022), or 8·N·D with recomputation.

    N is every (active) parameter including embeddings, as in Chinchilla's scaling fits; attention's
    sequence-length term is ignored. Prefer `training_flops` for time estimates.
    """
    return (8 if activation_recompute else 6) * active_parameters(config) * tokens


def training_time(
    config: EmberConfig, tokens: float, num_gpus: int, peak_flops_per_gpu: float, mfu: float, seq_len: int
) -> float:
    """Seconds to train on `tokens`: model FLOPs / (num_gpus x peak x MFU).

    MFU (model FLOPs utilisation, PaLM appendix B) counts model FLOPs only, so the recomputation overhead
    is not added here: a run that recomputes simply reaches a lower MFU.
    """
    return training_flops(config, tokens, seq_len) / (num_gpus * peak_flops_per_gpu * mfu)


def format_duration(seconds: float) -> str:
    """Human-readable duration, e.g. "3d 4h 05m" or "12m 30s"."""
    if not math.isfinite(seconds):
        return "inf"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def memory_per_gpu(
    config: EmberConfig, num_gpus: int, strategy: str = "ddp", micro_batch_size: int = 1, seq_len: int = 2048,
    activation_checkpointing: bool = False, param_bytes: int = 2, flash_attention: bool = False,
) -> dict[str, float]:
    """Estimated bytes per GPU for data-parallel training with Adam: params, grads, optimizer, activations.

    Model state follows ZeRO (Rajbhandari et al. 2019): mixed-precision Adam keeps 16 bytes per parameter,
    2 for the bf16/fp16 weights, 2 for their gradients and 12 for the fp32 master weights, momentum and
    variance (with `param_bytes=4`, plain fp32 training, there is no master copy: 4 + 4 + 8). ZeRO-1 shards
    the optimizer state over `num_gpus`, ZeRO-2 the gradients as well, ZeRO-3 the weights too.

    Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models"): per layer s·b·h·(34 + 5·a·s/h) bytes (s sequence, b micro-batch, h width, a heads), for 16-bit
    activations, no tensor or sequence parallelism, a GPT-style block. 5·a·s/h is the s x s attention scores,
    softmax and dropout mask; flash / memory-efficient SDPA kernels never store them (`flash_attention=True`
    drops the term). With full activation checkpointing only each layer's 16-bit input, 2·s·b·h, is kept
    (plus one layer's worth being recomputed, ignored here). Activations are not sharded by ZeRO.

    `logits` is the b·s·V fp32 tensor the loss upcasts to; at small widths and large vocabularies it rivals
    the whole layer stack. Not counted: temporary buffers, communication buckets, allocator fragmentation.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    n_params = count_parameters(config)
    stage = STRATEGIES.index(strategy)  # 0 = DDP, then the ZeRO stage
    optimizer_bytes = 8 + (4 if param_bytes < 4 else 0)
    s, b, h = seq_len, micro_batch_size, config.hidden_size
    if activation_checkpointing:
        per_layer = 2 * s * b * h
    else:
        per_layer = s * b * h * (34 + (0 if flash_attention else 5 * config.num_attention_heads * s / h))
    memory = {
        "params": n_params * param_bytes / (num_gpus if stage >= 3 else 1),
        "grads": n_params * param_bytes / (num_gpus if stage >= 2 else 1),
        "optimizer": n_params * optimizer_bytes / (num_gpus if stage >= 1 else 1),
        "activations": float(config.num_hidden_layers * per_layer),
        "logits": float(b * s * config.vocab_size * 4),
    }
    memory["total"] = sum(memory.values())
    return memory


@dataclass
class SizingArguments:
    preset: str = field(metadata={"help": f"one of {sorted(PRESETS)}"})
    model_overrides: dict = field(default_factory=dict, metadata={"help": "EmberConfig fields over the preset"})
    seq_len: int | None = field(default=None, metadata={"help": "default: the config's max_position_embeddings"})
    tokens: float | None = field(default=None, metadata={"help": "default: 20 tokens per parameter (Chinchilla)"})
    num_gpus: int = 1
    gpu: str = field(default="H100", metadata={"help": f"one of {list(PEAK_FLOPS)}"})
    peak_tflops: float | None = field(default=None, metadata={"help": "dense peak per GPU, overrides gpu's entry"})
    mfu: float = field(default=0.4, metadata={"help": "model FLOPs utilisation, 0-1"})
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    flash_attention: bool = field(default=False, metadata={"help": "drop the stored s x s attention scores"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def build_report(args: SizingArguments) -> dict:
    if args.preset not in PRESETS:
        raise ConfigError(f"preset: unknown name {args.preset!r}; choose one of {sorted(PRESETS)}")
    for key in ("num_gpus", "micro_batch_size", "seq_len", "tokens"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"mfu: must be in (0, 1], got {args.mfu}")
    known = {f.name for f in dataclasses.fields(EmberConfig)}
    unknown = sorted(set(args.model_overrides) - known)
    if unknown:
        raise ConfigError(f"model_overrides.{unknown[0]}: unknown EmberConfig field")
    try:
        config = EmberConfig.from_preset(args.preset, **args.model_overrides)
    except Exception as err:  # Ember's own checks, and the strict config dataclass's type checks
        raise ConfigError(f"model_overrides: {' '.join(str(err).split())}") from None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for_device(args.gpu)
    if peak is None:
        raise ConfigError(f"gpu: unknown device {args.gpu!r}; choose one of {list(PEAK_FLOPS)} or give peak_tflops")
    seq_len = args.seq_len or config.max_position_embeddings
    tokens = args.tokens if args.tokens is not None else CHINCHILLA_TOKENS_PER_PARAM * count_parameters(config)
    seconds = training_time(config, tokens, args.num_gpus, peak, args.mfu, seq_len)
    memory = {
        strategy: memory_per_gpu(
            config, args.num_gpus, strategy, args.micro_batch_size, seq_len,
            args.activation_checkpointing, flash_attention=args.flash_attention,
        )
        for strategy in STRATEGIES
    }
    return {
        "preset": args.preset, "overrides": args.model_overrides, "seq_len": seq_len, "tokens": tokens,
        "parameters": count_parameters(config), "active_parameters": active_parameters(config),
        "breakdown": parameter_breakdown(config), "flops_per_token": flops_per_token(config, seq_len),
        "training_flops": training_flops(config, tokens, seq_len),
        "training_flops_recompute": training_flops(config, tokens, seq_len, activation_recompute=True),
        "training_flops_6nd": training_flops_6nd(config, tokens),
        "gpu": args.gpu, "peak_flops_per_gpu": peak, "num_gpus": args.num_gpus, "mfu": args.mfu,
        "training_seconds": seconds, "training_time": format_duration(seconds),
        "micro_batch_size": args.micro_batch_size, "memory_bytes": memory,
    }


def format_report(r: dict) -> str:
    lines = [f"Ember {r['preset']}" + (f" with {r['overrides']}" if r["overrides"] else "")]
    lines.append(f"  parameters        {r['parameters']:>16,}  (active per token {r['active_parameters']:,})")
    lines += [f"    {name:<15} {count:>16,}" for name, count in r["breakdown"].items() if count]
    lines += [
        f"  FLOPs/token       {r['flops_per_token']:>16.4g}  (6N + 12·L·heads·head_dim·T, T={r['seq_len']})",
        f"  tokens            {r['tokens']:>16.4g}",
        f"  training FLOPs    {r['training_flops']:>16.4g}  ({r['training_flops_recompute']:.4g} with recompute,"
        f" 6ND: {r['training_flops_6nd']:.4g})",
        f"  time              {r['training_time']:>16}  ({r['num_gpus']} x {r['gpu']} at"
        f" {r['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s, MFU {r['mfu']:.0%})",
        f"  memory per GPU (GiB), micro-batch {r['micro_batch_size']}, seq {r['seq_len']}:",
        f"    {'':<8}" + "".join(f"{key:>12}" for key in next(iter(r["memory_bytes"].values()))),
    ]
    for strategy, mem in r["memory_bytes"].items():
        lines.append(f"    {strategy:<8}" + "".join(f"{value / 2**30:>12.2f}" for value in mem.values()))
    return "\n".join(lines)


def _old_overrides(argv: list[str]) -> list[str]:
    """The old `--override KEY=VALUE` spelling as `--model_overrides.KEY=VALUE`, with a deprecation line."""
    result, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--override" and rest:
            token = f"--override={rest.pop(0)}"
        if token.startswith("--override="):
            key, _, value = token.removeprefix("--override=").partition("=")
            print(f"warning: --override {key}={value} is deprecated, write --model_overrides.{key}={value}",
                  file=sys.stderr)
            token = f"--model_overrides.{key}={value}"
        result.append(token)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((SizingArguments,), _old_overrides(list(sys.argv[1:] if argv is None else argv)),
                             prog="python -m modeling.sizing", description=__doc__.splitlines()[0],
                             space_values=True)
        report = build_report(args)
    except ConfigError as err:
        return report_error(err)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
