"""Back-of-the-envelope sizing for Ember models: parameters, training FLOPs, wall-clock time, GPU memory.

Everything here is closed-form arithmetic on an `EmberConfig`; no model is built. The parameter count is
exact (the tests check it against `EmberForCausalLM(config).parameters()`); the FLOP and time figures are
the standard estimates from the literature, with their assumptions stated where they are used. The memory
figures are counted tensor by tensor from what Ember's block stores; the tests check them against the
tensors autograd saves and against the peak of torch's allocations in real training steps, and
benchmarks/bench_sizing_cpu.py checks time and memory against measured steps up to the 125m preset.

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
# The loss upcasts the logits to fp32; when backward starts its log-softmax output, that output's gradient and the
# logits' gradient are alive at once: 3 x 4 bytes per (token, vocabulary entry).
LOGITS_BYTES_PER_ENTRY = 12


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
    config: EmberConfig, tokens: float, num_gpus: int, peak_flops_per_gpu: float, mfu: float, seq_len: int,
    memory_bound_bandwidth: float | None = None, param_bytes: int = 2, flash_attention: bool = True,
    attention_mask: bool = False,
) -> float:
    """Seconds to train on `tokens`: model FLOPs / (num_gpus x peak x MFU), plus the memory-bound work if
    `memory_bound_bandwidth` is given.

    MFU (model FLOPs utilisation, PaLM appendix B) counts model FLOPs only, so the recomputation overhead
    is not added here: a run that recomputes simply reaches a lower MFU.

    With FLOPs alone, an MFU measured on one model misjudges another: besides the matmuls and the attention
    kernel a step runs elementwise work (norms, RoPE, SwiGLU, residual adds, the loss's softmax over the
    vocabulary, their gradients, the optimizer) whose time follows the bytes it streams, not FLOPs, and its
    share of the step changes with the width and the vocabulary. With `memory_bound_bandwidth` (bytes per
    second per device: a device's effective rate for this work, which benchmarks/bench_sizing_cpu.py
    measures) the time adds `memory_bound_bytes` / (num_gpus x memory_bound_bandwidth), and `mfu` is then the
    efficiency of the matmul and attention kernels alone. On the 2-core CPU of that benchmark, calibrated on
    the nano preset, the two terms predicted the 28 M and 125m steps within the errors its results file
    records, where FLOPs alone were 15-45% over.
    """
    seconds = training_flops(config, tokens, seq_len) / (num_gpus * peak_flops_per_gpu * mfu)
    if memory_bound_bandwidth:
        streamed = memory_bound_bytes(config, tokens, seq_len, param_bytes, flash_attention, attention_mask)
        seconds += streamed / (num_gpus * memory_bound_bandwidth)
    return seconds


def memory_bound_bytes(config: EmberConfig, tokens: float, seq_len: int, param_bytes: int = 2,
                       flash_attention: bool = True, attention_mask: bool = False) -> float:
    """The bytes a step's elementwise work streams, as `training_time`'s memory-bound term counts them: the
    activations stored for backward (`activation_bytes_per_token`: L layers and the final norm) and the loss's
    three fp32 tokens x vocabulary tensors (`memory_per_gpu`'s logits), for `tokens` tokens."""
    per_token = activation_bytes_per_token(config, seq_len, param_bytes, flash_attention, attention_mask)
    stored = config.num_hidden_layers * per_token["layer"] + per_token["final"]
    return tokens * (stored + LOGITS_BYTES_PER_ENTRY * config.vocab_size)


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


def activation_bytes_per_token(config: EmberConfig, seq_len: int, param_bytes: int = 2,
                               flash_attention: bool = False, attention_mask: bool = False) -> dict[str, float]:
    """Bytes autograd keeps for the backward pass, per token: one decoder layer's, and the final norm's.

    Counted tensor by tensor from what Ember's block stores (pre-norm, RMSNorm, RoPE, GQA, SwiGLU), as
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") do for a
    GPT block; their 34·h + 5·a·s bytes assume 16-bit activations everywhere, a 4h GELU MLP and dropout,
    none of which holds here. h is the width, q and k the query and key/value widths (heads x head_dim),
    i the MLP width, a the query heads, s the sequence length.

    fp32 (`param_bytes=4`), 4 bytes a value:

    - residual stream, the layer input and the sum after attention: 2h;
    - each RMSNorm, its normalised input and its weighted output: 2h (LayerNorm: its output, h);
    - fused attention (SDPA, flash): the query after RoPE, key, value and output, 2q + 2k. With a mask
      transformers repeats the key/value heads to the query heads for SDPA, 2q + 2q (with a single
      K/V head the repeat is a view);
    - eager attention: query, repeated key and value and the output's contiguous copy, 4q, plus the
      softmax probabilities, a·s, always fp32;
    - gated MLP: gate, its activation, up and their product, 4i (plain MLP: up and its activation, 2i);
      MoE: per routed copy of a token (`num_experts_per_tok`), its input, gate and up, activation,
      product and output, 2h + 4i, fp32 in both precisions (the experts' grouped matmuls are not cast);
    - `attention_mask` with a fused kernel: SDPA converts the boolean (b, 1, s, s) mask to the query's
      dtype in every layer and keeps it: s per token and layer. Eager adds the mask, storing nothing.

    Mixed precision (`param_bytes=2`, bf16/fp16 autocast): matmuls and SDPA store 16-bit values, but the
    residual stream stays fp32 (embedding outputs are fp32 and fp32 + 16-bit promotes), RMSNorm
    normalises in fp32, and autocast casts a norm's fp32 output once per matmul that reads it (q, k, v;
    gate, up). So: residual 2 x 4h; per RMSNorm 4h plus 2h per reading matmul (LayerNorm: the casts
    only); fused attention 2 x (2q + 2k); eager 2 x 4q plus the probabilities in fp32 and their 16-bit
    copy, 6·a·s; gated MLP 2 x 4i; the mask, 2s. With pure 16-bit weights (DeepSpeed bf16) the residual
    is 16-bit but the norms upcast, which comes to a few percent more.

    The final norm stores its input and what its norm stores (read by lm_head alone). Left out, each
    under 2% here: the RoPE tables (8·head_dim bytes per token, shared by the layers), norm statistics,
    attention log-sum-exp and the token ids. Counted as the pre-norm block: the sandwich, post and
    DeepNorm placements, QK-norm and dropout.
    """
    h, i, a, n_kv = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    q = a * config.head_dim
    key = value_width = n_kv * config.head_dim
    if attention_mask and flash_attention and n_kv < a:  # transformers repeats the K/V heads for a masked SDPA
        if n_kv > 1:
            key = value_width = q
        elif param_bytes < 4:  # one K/V head: the repeat is a stride-0 view, but autocast's cast copies the key
            key = q
    rms = config.norm_type != "layernorm"
    if param_bytes >= 4:
        value, probabilities = 4, 4 * a * seq_len

        def norm(readers: int) -> int:
            return 4 * h * (2 if rms else 1)
    else:
        value, probabilities = 2, 6 * a * seq_len

        def norm(readers: int) -> int:
            return (4 * h if rms else 0) + 2 * h * readers
    attention = value * (2 * q + key + value_width) if flash_attention else value * 4 * q + probabilities
    if config.is_moe:
        mlp, mlp_readers = config.num_experts_per_tok * 4 * (2 * h + 4 * i), 1
    else:
        mlp, mlp_readers = (value * 4 * i, 2) if config.is_gated_mlp else (value * 2 * i, 1)
    mask = value * seq_len if attention_mask and flash_attention else 0
    layer = 2 * 4 * h + norm(3) + norm(mlp_readers) + attention + mlp + mask
    final = 4 * h + norm(1)
    return {"layer": float(layer), "final": float(final)}


def memory_per_gpu(
    config: EmberConfig, num_gpus: int, strategy: str = "ddp", micro_batch_size: int = 1, seq_len: int = 2048,
    activation_checkpointing: bool = False, param_bytes: int = 2, flash_attention: bool = False,
    attention_mask: bool = False, gradients_persist: bool = True,
) -> dict[str, float]:
    """Estimated peak bytes per GPU for data-parallel training with Adam: params, grads, optimizer, activations.

    Model state follows ZeRO (Rajbhandari et al. 2019): mixed-precision Adam keeps 16 bytes per parameter,
    2 for the bf16/fp16 weights, 2 for their gradients and 12 for the fp32 master weights, momentum and
    variance (with `param_bytes=4`, plain fp32 training, there is no master copy: 4 + 4 + 8). ZeRO-1 shards
    the optimizer state over `num_gpus`, ZeRO-2 the gradients as well, ZeRO-3 the weights too. (The
    Trainer's bf16 autocast instead keeps fp32 weights and gradients, 4 + 4 + 8, plus a bf16 copy of
    every matrix during the step: 18 bytes per parameter.)

    Activations: `activation_bytes_per_token` per layer and token, times s·b·L, plus the final norm's.
    `flash_attention`: a fused kernel (SDPA, flash-attention) that never stores the s x s scores; False
    means eager attention. `attention_mask`: a (b, 1, s, s) mask reaches the attention, as when packed
    rows keep documents apart through `position_ids` under SDPA or eager (the recipes' default; a batch
    without a document boundary gets no mask); flash-attention's variable-length path takes none. With
    full activation checkpointing each layer keeps only its fp32 input, 4·s·b·h, plus the one layer being
    recomputed in the backward pass. Activations are not sharded by ZeRO.

    `logits`: 12·b·s·V. The loss upcasts the logits to fp32, and at the start of the backward pass three
    fp32 b x s x V tensors are alive at once, the log-softmax output the loss kept, its gradient and the
    logits' gradient; at small widths and large vocabularies this rivals the whole layer stack.

    The peak, "total": the state plus the activations and logits, which peak when the backward pass
    starts. `gradients_persist=True` counts the gradients there too: DDP's buckets, sharded gradients
    and gradient accumulation keep them through the forward pass. With one device, no accumulation and
    `zero_grad(set_to_none=True)` (the Trainer's) they are freed every step and fill up only as the
    activations are freed, so the peak is the state plus the larger of the two. Not counted: temporary
    buffers, communication buckets beyond the gradients, allocator fragmentation, the CUDA context.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    n_params = count_parameters(config)
    stage = STRATEGIES.index(strategy)  # 0 = DDP, then the ZeRO stage
    optimizer_bytes = 8 + (4 if param_bytes < 4 else 0)
    tokens = seq_len * micro_batch_size
    per_token = activation_bytes_per_token(config, seq_len, param_bytes, flash_attention, attention_mask)
    if activation_checkpointing:
        activations = tokens * (config.num_hidden_layers * 4 * config.hidden_size + per_token["layer"])
    else:
        activations = tokens * config.num_hidden_layers * per_token["layer"]
    memory = {
        "params": n_params * param_bytes / (num_gpus if stage >= 3 else 1),
        "grads": n_params * param_bytes / (num_gpus if stage >= 2 else 1),
        "optimizer": n_params * optimizer_bytes / (num_gpus if stage >= 1 else 1),
        "activations": float(activations + tokens * per_token["final"]),
        "logits": float(LOGITS_BYTES_PER_ENTRY * tokens * config.vocab_size),
    }
    step = memory["activations"] + memory["logits"]
    state = memory["params"] + memory["optimizer"]
    memory["total"] = state + (memory["grads"] + step if gradients_persist else max(memory["grads"], step))
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
    memory_bound_gbps: float | None = field(default=None, metadata={
        "help": "GB/s the memory-bound work (stored activations and the loss's logits) streams per GPU (measured "
                "as in benchmarks/bench_sizing_cpu.py); adds that time, and mfu then covers the matmul and "
                "attention kernels alone"})
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    flash_attention: bool = field(default=False, metadata={
        "help": "a fused attention kernel (sdpa, flash_attention_2), which stores no s x s scores; false: eager"})
    attention_mask: bool = field(default=False, metadata={
        "help": "a (b, 1, s, s) mask reaches the attention: packed documents kept apart by position_ids under "
                "sdpa or eager (the recipes' default)"})
    param_bytes: int = field(default=2, metadata={"help": "2: bf16/fp16 mixed precision, 4: fp32 training"})
    gradients_persist: bool = field(default=True, metadata={
        "help": "gradients alive through the forward pass (DDP, ZeRO, gradient accumulation); false: one device "
                "that frees them every step"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def build_report(args: SizingArguments) -> dict:
    if args.preset not in PRESETS:
        raise ConfigError(f"preset: unknown name {args.preset!r}; choose one of {sorted(PRESETS)}")
    for key in ("num_gpus", "micro_batch_size", "seq_len", "tokens", "memory_bound_gbps"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"mfu: must be in (0, 1], got {args.mfu}")
    if args.param_bytes not in (2, 4):
        raise ConfigError(f"param_bytes: must be 2 (mixed precision) or 4 (fp32), got {args.param_bytes}")
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
    seconds = training_time(config, tokens, args.num_gpus, peak, args.mfu, seq_len,
                            args.memory_bound_gbps * 1e9 if args.memory_bound_gbps else None, args.param_bytes,
                            args.flash_attention, args.attention_mask)
    memory = {
        strategy: memory_per_gpu(
            config, args.num_gpus, strategy, args.micro_batch_size, seq_len, args.activation_checkpointing,
            param_bytes=args.param_bytes, flash_attention=args.flash_attention, attention_mask=args.attention_mask,
            gradients_persist=args.gradients_persist,
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
        "memory_bound_gbps": args.memory_bound_gbps,
        "training_seconds": seconds, "training_time": format_duration(seconds),
        "micro_batch_size": args.micro_batch_size, "param_bytes": args.param_bytes, "memory_bytes": memory,
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
        f" {r['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s, MFU {r['mfu']:.0%}"
        + (f", memory-bound work at {r['memory_bound_gbps']:g} GB/s)" if r["memory_bound_gbps"] else ")"),
        f"  memory per GPU (GiB), micro-batch {r['micro_batch_size']}, seq {r['seq_len']}, "
        f"{'fp32' if r['param_bytes'] == 4 else 'mixed precision'}:",
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
