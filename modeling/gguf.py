"""Export an Ember checkpoint (or a LoRA adapter merged into its base) as a GGUF file llama.cpp runs as is.

    python -m modeling.convert to-gguf SRC OUT.gguf [--outtype=f32|f16|bf16|q8_0]

The file is written with the `gguf` package that ggml publishes with llama.cpp: architecture `llama`
(dense models and Mixtral-style MoE alike), or `qwen3` for a dense model with `qk_norm` (llama.cpp's Qwen3
graph normalises each head's queries and keys before RoPE, as Ember does), the weights under llama.cpp's
tensor names, and the tokenizer as llama.cpp's byte-level BPE (`gpt2`) vocabulary with merges, token types,
special token ids, explicit add-BOS / add-EOS flags and the chat template.

What llama.cpp needs that transformers does not:

* Rotary layout. transformers rotates dimension i of a head together with i + head_dim/2; llama.cpp's
  `llama` graph rotates adjacent pairs (2i, 2i+1). The rows of q_proj and k_proj (and their biases) are
  reordered accordingly, which leaves q.k, and so the model, unchanged. Its `qwen3` graph rotates as
  transformers does, so a `qwen3` export keeps the rows (and the per-head QK-norm weights) as they are.
* Pre-tokenizer type. llama.cpp does not read a tokenizer's split regex; it knows a fixed set of them by
  name. The tokenizer.json is checked, not assumed: the byte-level BPE that data_prep trains splits
  text with exactly the regex llama.cpp calls `qwen2`, and anything else is refused.
* The chat template's `{% generation %}` markers (transformers' assistant mask) are not plain Jinja;
  they render as nothing, so the GGUF carries the template with them turned into no-op blocks.

Settings the architecture cannot run are refused with a one-line `ValueError` naming the field:
a sliding window (llama.cpp would attend to the whole context: same logits up to the window, different
after it; no llama.cpp architecture with Ember's layout applies a window to every layer), positions
other than RoPE, dynamic (NTK) RoPE scaling, LayerNorm, norms other than pre-norm, an encoder, the plain
GELU MLP, an activation other than SiLU; for `qwen3`, also experts and biases.

Outtypes: `f32` keeps every weight in float32; `f16` and `bf16` store matrices in 16 bits; `q8_0`
stores matrices as llama.cpp's 8-bit blocks (a matrix whose rows are not a multiple of 32 stays f16).
Norm weights, biases and the MoE router stay float32 in every outtype, as llama.cpp expects.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from cli import file_mode

from . import EmberConfig, EmberForCausalLM
from .loading import adapter_base, is_adapter, load_model, load_strict
from .tokenizer_config import adds_bos_eos

LLAMA, QWEN3 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Split regex of a byte-level BPE tokenizer.json -> the llama.cpp pre-tokenizer type that applies the same split.
# Qwen2's regex, which llama.cpp implements as "qwen2", is the one data_prep trains with (PRETOKENIZE_REGEX).
PRE_TOKENIZER_TYPES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
# Settings the llama graph hard-codes.
REQUIRED = {"position_embedding_type": "rope", "norm_type": "rmsnorm", "mlp_type": "swiglu", "hidden_act": "silu",
            "norm_placement": "pre", "is_causal": True, "embedding_norm": False}
# RoPE types llama.cpp runs (llama3 through a per-frequency factor tensor, not a scaling type).
ROPE_SCALING = {"default": None, "linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN,
                "llama3": None}

T = gguf.MODEL_TENSOR
# Ember module or parameter (the part after "model.layers.N.") -> llama.cpp tensor.
LAYER_TENSORS = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
    "mlp.gate": T.FFN_GATE_INP,
    "mlp.experts.down_proj": T.FFN_DOWN_EXP,
    "self_attn.q_norm": T.ATTN_Q_NORM,  # qwen3 only
    "self_attn.k_norm": T.ATTN_K_NORM,
}
MODEL_TENSORS = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM,
                 "lm_head.weight": T.OUTPUT}
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------

def architecture(config: EmberConfig) -> str:
    """The llama.cpp architecture that runs `config`: `qwen3` for QK-norm, else `llama`."""
    return QWEN3 if config.qk_norm else LLAMA


def check_config(config: EmberConfig) -> None:
    """Raise a one-line `ValueError` naming the first setting llama.cpp's architecture for `config` cannot run."""
    arch = architecture(config)
    for name, value in REQUIRED.items():
        if getattr(config, name) != value:
            raise ValueError(f"{name}: {getattr(config, name)!r} cannot be exported to GGUF "
                             f"(llama.cpp's {arch} architecture needs {value!r})")
    if config.sliding_window is not None:
        raise ValueError(f"sliding_window: {config.sliding_window} cannot be exported to GGUF (llama.cpp's {arch} "
                         "architecture attends to the whole context: outputs would differ past the window)")
    if arch == QWEN3:
        for name in ("num_local_experts", "attention_bias", "mlp_bias"):
            if getattr(config, name):
                raise ValueError(f"{name}: {getattr(config, name)!r} with qk_norm=True cannot be exported to GGUF "
                                 f"(llama.cpp's {arch} architecture is dense, without biases)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ROPE_SCALING:
        raise ValueError(f"rope_parameters.rope_type: {rope_type!r} cannot be exported to GGUF "
                         f"(supported: {', '.join(ROPE_SCALING)})")
    if rope_type == "llama3" and arch == QWEN3:
        raise ValueError(f"rope_parameters.rope_type: 'llama3' with qk_norm=True cannot be exported to GGUF "
                         f"(llama.cpp's {arch} architecture reads no per-frequency factors)")


def pre_tokenizer_type(state: dict[str, Any], where: str) -> str:
    """The llama.cpp pre-tokenizer type that splits text as the tokenizer.json `state` does, or a one-line
    `ValueError`: llama.cpp runs only the splits it knows by name, so an unknown one would tokenize differently."""
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: model: a {model.get('type')!r} tokenizer cannot be exported to GGUF "
                         "(to-gguf exports byte-level BPE tokenizers)")
    for option in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(option):
            raise ValueError(f"{where}: model.{option}: {model[option]!r} has no llama.cpp equivalent")
    if state.get("normalizer") is not None:
        raise ValueError(f"{where}: normalizer: llama.cpp's byte-level BPE applies none, this tokenizer has "
                         f"{state['normalizer'].get('type')!r}")
    steps = state.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", []) if steps.get("type") == "Sequence" else [steps]
    split, byte_level = steps if len(steps) == 2 else ({}, {})
    regex = (split.get("pattern") or {}).get("Regex")
    if not (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and not byte_level.get("add_prefix_space")):
        raise ValueError(f"{where}: pre_tokenizer: expected a Split regex followed by ByteLevel, the byte-level BPE "
                         "that data_prep trains; llama.cpp has no pre-tokenizer type for this one")
    if regex not in PRE_TOKENIZER_TYPES:
        raise ValueError(f"{where}: pre_tokenizer: the split regex {regex!r} has no llama.cpp pre-tokenizer type "
                         "(supported: the one data_prep trains with, llama.cpp's 'qwen2')")
    return PRE_TOKENIZER_TYPES[regex]


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------

def rope_pairs_interleaved(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k rows (or bias) from transformers' rotate-half order to the adjacent pairs llama.cpp rotates."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: EmberForCausalLM) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every weight of `model`, in the layout llama.cpp reads."""
    config = model.config
    interleave = architecture(config) == LLAMA  # llama's graph rotates adjacent pairs; qwen3's as transformers does
    tensors = []
    for key, value in model.state_dict().items():
        array = value.detach().to(torch.float32).cpu().numpy()
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if key in MODEL_TENSORS:
            tensors.append((gguf.TENSOR_NAMES[MODEL_TENSORS[key]] + ".weight", array))
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?", key)
        if match is None:
            raise ValueError(f"{key}: no llama.cpp tensor for this parameter")
        layer, name, kind = int(match[1]), match[2], match[3]
        if name == "mlp.experts.gate_up_proj":  # (experts, 2 * intermediate, hidden): gate rows, then up rows
            gate, up = np.split(array, 2, axis=1)
            tensors.append((gguf.TENSOR_NAMES[T.FFN_GATE_EXP].format(bid=layer) + ".weight", gate))
            tensors.append((gguf.TENSOR_NAMES[T.FFN_UP_EXP].format(bid=layer) + ".weight", up))
            continue
        if name not in LAYER_TENSORS:
            raise ValueError(f"{key}: no llama.cpp tensor for this parameter")
        if interleave and name == "self_attn.q_proj":
            array = rope_pairs_interleaved(array, config.num_attention_heads)
        elif interleave and name == "self_attn.k_proj":
            array = rope_pairs_interleaved(array, config.num_key_value_heads)
        tensors.append((gguf.TENSOR_NAMES[LAYER_TENSORS[name]].format(bid=layer) + "." + (kind or "weight"), array))
    return tensors


def _add_rope(writer: gguf.GGUFWriter, model: EmberForCausalLM) -> None:
    """RoPE's base and scaling as llama.cpp reads them: linear and YaRN through the rope.scaling keys; llama3
    through `rope_freqs`, the factor that divides each frequency (the unscaled ones over transformers' own)."""
    config = model.config
    rope = dict(config.rope_parameters or {})
    rope_type, base = rope.get("rope_type", "default"), float(rope.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(base)
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(ROPE_SCALING[rope_type])
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope_type == "yarn":
        factor = float(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow") or 1))
        # llama.cpp scales cos/sin by YaRN's own 1 + 0.1 ln(factor) times rope.scaling.attn_factor; transformers by
        # its attention factor, which is that unless rope_parameters sets attention_factor or mscale.
        attention = model.model.rotary_emb.attention_scaling
        writer.add_rope_scaling_attn_factors(float(attention / (1 + 0.1 * math.log(factor))))
    if rope_type == "llama3":
        dim = config.head_dim
        unscaled = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        factors = (unscaled / model.model.rotary_emb.original_inv_freq.double()).float().numpy()
        writer.add_tensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", factors, raw_dtype=gguf.GGMLQuantizationType.F32)


def _encode(name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, Any]:
    """The array as stored, and its GGML type: norms, biases and the router in float32, matrices in `qtype`."""
    f32 = gguf.GGMLQuantizationType.F32
    if array.ndim == 1 or ".ffn_gate_inp." in name or qtype == f32:
        return array.astype(np.float32), f32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> str:
    """Vocabulary, merges, special tokens and chat template of `tokenizer_dir`; returns the pre-tokenizer type."""
    state, pre = _tokenizer_state(tokenizer_dir)
    file = tokenizer_dir / "tokenizer.json"
    backend = Tokenizer.from_str(json.dumps(state))
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"vocab_size: the model has {vocab_size} embeddings, the tokenizer {file} uses ids up to "
                         f"{max(vocab.values())}")
    added = backend.get_added_tokens_decoder()
    # Ids the tokenizer never produces (an embedding padded past the vocabulary) get placeholder tokens.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
        else:
            types[index] = gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    # What the tokenizer does, written explicitly: llama.cpp's default depends on the pre-tokenizer type.
    ids = special.special_token_ids
    special.add_special_token = dict(zip(("bos", "eos"), adds_bos_eos(backend, ids.get("bos"), ids.get("eos"))))
    if isinstance(special.chat_template, str):
        special.chat_template = _GENERATION_TAG.sub(
            lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", special.chat_template)
    special.add_to_gguf(writer, quiet=True)
    return pre


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def write_gguf(model: EmberForCausalLM, tokenizer_dir: Path, out: Path, outtype: str = "f16",
               name: str | None = None) -> dict[str, Any]:
    """Write `model` with the tokenizer in `tokenizer_dir` to the GGUF file `out` (replaced atomically)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype: must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    config = model.config
    check_config(config)
    qtype, file_type = OUTTYPES[outtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(handle, file_mode())  # mkstemp's 0600 would stay with the renamed file
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, architecture(config))
        writer.add_name(name or out.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        _add_rope(writer, model)
        if config.num_local_experts > 0:
            writer.add_expert_count(config.num_local_experts)
            writer.add_expert_used_count(config.num_experts_per_tok)
        pre = _add_tokenizer(writer, tokenizer_dir, config.vocab_size)
        for tensor_name, array in gguf_tensors(model):
            data, stored = _encode(tensor_name, array, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"architecture": architecture(config), "outtype": outtype, "pre_tokenizer": pre, "path": str(out)}


def to_gguf(src: str | Path, out: str | Path, outtype: str = "f16") -> dict[str, Any]:
    """Export the Ember checkpoint, or the LoRA adapter merged into its base, in `src` to the GGUF file `out`.

    An adapter folder (one with adapter_config.json) is merged into the base its config names (found as
    `modeling.loading` finds it); its tokenizer is the adapter folder's when it has one, else the base's.
    """
    src, out = Path(src), Path(out)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype: must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the path of the .gguf file to write")
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    if not is_adapter(src):
        _check_checkpoint(src)
        _tokenizer_state(src)  # before loading the weights
        return write_gguf(load_strict(EmberForCausalLM, src), src, out, outtype, name=src.name)
    base = adapter_base(src)
    if not (Path(base) / "config.json").is_file():
        raise ValueError(f"{src / 'adapter_config.json'}: base_model_name_or_path: {str(base)!r} is not a "
                         "checkpoint folder (absolute, or relative to the working directory or the adapter)")
    _check_checkpoint(Path(base))
    tokenizer_dir = src if (src / "tokenizer.json").is_file() else Path(base)
    _tokenizer_state(tokenizer_dir)  # a tokenizer llama.cpp cannot run fails before the merge
    return write_gguf(load_model(src, merge_adapter=True), tokenizer_dir, out, outtype, name=src.name)


def _check_checkpoint(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a model directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if model_type != EmberConfig.model_type:
        raise ValueError(f"model_type: {path} holds a {model_type!r} checkpoint, to-gguf converts 'ember' ones")
    check_config(EmberConfig.from_pretrained(path))


def _tokenizer_state(tokenizer_dir: Path) -> tuple[dict[str, Any], str]:
    """tokenizer.json of `tokenizer_dir` and its llama.cpp pre-tokenizer type, or a one-line ValueError."""
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{tokenizer_dir}: no tokenizer.json (a GGUF carries its tokenizer)")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    return state, pre_tokenizer_type(state, str(file))
