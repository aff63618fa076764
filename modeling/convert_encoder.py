"""An Ember encoder as transformers' stock `ModernBertForMaskedLM` (`to-hf` on an `EmberForMaskedLM` checkpoint).

ModernBERT is a pre-norm bidirectional encoder with RoPE, LayerNorm and a gated MLP; Ember builds the same
model with `embedding_norm` (a norm over the embeddings, the first block without an input norm) and
`mlm_head_transform` (dense, activation and norm before the tied output projection). ModernBERT fuses the
query, key and value projections (`Wqkv`) and the gate and up projections (`Wi`, the activation on its first
half), so the export concatenates Ember's matrices; every other weight maps one to one. Its alternating local
attention is off (every layer global), as Ember's encoder attends to the whole sequence.

Other encoder settings have no stock class and are refused in one line naming the `EmberConfig` field.
"""

from __future__ import annotations

import warnings

import torch
from transformers import ModernBertConfig

from .configuration_ember import EmberConfig

# EmberConfig field -> the value ModernBERT's architecture needs.
REQUIRED = {"embedding_norm": True, "mlm_head_transform": True, "norm_type": "layernorm", "norm_placement": "pre",
            "position_embedding_type": "rope", "qk_norm": False, "sliding_window": None, "num_local_experts": 0}
TARGET = "ModernBertForMaskedLM"


def modernbert_config(config: EmberConfig) -> ModernBertConfig:
    """The `ModernBertConfig` of the same model, or a one-line `ValueError` naming the first field it cannot hold."""
    for name, value in REQUIRED.items():
        if getattr(config, name) != value:
            raise ValueError(f"{name}: {getattr(config, name)!r} has no stock transformers equivalent for an encoder "
                             f"({TARGET} needs {value!r})")
    if not config.is_gated_mlp:
        raise ValueError(f"mlp_type: {config.mlp_type!r} has no stock transformers equivalent for an encoder "
                         f"({TARGET} has a gated MLP: geglu, swiglu or reglu)")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(f"num_key_value_heads: {config.num_key_value_heads} has no stock transformers equivalent for "
                         f"an encoder ({TARGET} has one key/value head per query head, "
                         f"{config.num_attention_heads})")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"head_dim: {config.head_dim} has no stock transformers equivalent for an encoder "
                         f"({TARGET} needs hidden_size / num_attention_heads = "
                         f"{config.hidden_size // config.num_attention_heads})")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type: {rope['rope_type']!r} is not exported for an encoder "
                         f"({TARGET} is exported with unscaled RoPE)")
    if config.hidden_dropout > 0:
        warnings.warn(f"hidden_dropout={config.hidden_dropout} is dropped: it is training-only, so inference is "
                      "unchanged", UserWarning, stacklevel=2)
    theta = float(rope.get("rope_theta", 10000.0))
    return ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        hidden_activation=config.hidden_act, classifier_activation=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        norm_eps=config.norm_eps, norm_bias=True, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
        classifier_bias=config.mlp_bias, decoder_bias=False, attention_dropout=config.attention_dropout,
        layer_types=["full_attention"] * config.num_hidden_layers,
        rope_parameters={kind: {"rope_type": "default", "rope_theta": theta}
                         for kind in ("full_attention", "sliding_attention")},
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, cls_token_id=config.bos_token_id,
        sep_token_id=config.eos_token_id)


def legacy_keys(config: ModernBertConfig) -> dict:
    """The keys transformers 4.x's ModernBERT reads instead of `layer_types` / `rope_parameters`: without them it
    would make two of every three layers local."""
    theta = config.rope_parameters["full_attention"]["rope_theta"]
    return {"global_attn_every_n_layers": 1, "global_rope_theta": theta, "local_rope_theta": theta,
            "torch_dtype": str(config.dtype or "float32").removeprefix("torch.")}


def modernbert_state_dict(state: dict[str, torch.Tensor], config: EmberConfig) -> dict[str, torch.Tensor]:
    """An `EmberForMaskedLM` state dict under ModernBERT's names, with its fused projections."""
    out = {"model.embeddings.tok_embeddings.weight": state["model.embed_tokens.weight"],
           "model.final_norm.weight": state["model.norm.weight"], "model.final_norm.bias": state["model.norm.bias"]}
    for kind in ("weight", "bias"):
        out[f"model.embeddings.norm.{kind}"] = state[f"model.embed_norm.{kind}"]
        out[f"head.norm.{kind}"] = state[f"head.norm.{kind}"]
    out["head.dense.weight"] = state["head.dense.weight"]
    if config.mlp_bias:
        out["head.dense.bias"] = state["head.dense.bias"]
    out["decoder.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        ember, bert = f"model.layers.{i}.", f"model.layers.{i}."
        kinds = ("weight", "bias") if config.attention_bias else ("weight",)
        for kind in kinds:
            out[f"{bert}attn.Wqkv.{kind}"] = torch.cat([state[f"{ember}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{bert}attn.Wo.{kind}"] = state[f"{ember}self_attn.o_proj.{kind}"]
        for kind in (("weight", "bias") if config.mlp_bias else ("weight",)):
            out[f"{bert}mlp.Wi.{kind}"] = torch.cat([state[f"{ember}mlp.gate_proj.{kind}"],
                                                     state[f"{ember}mlp.up_proj.{kind}"]])
            out[f"{bert}mlp.Wo.{kind}"] = state[f"{ember}mlp.down_proj.{kind}"]
        for kind in ("weight", "bias"):
            if i > 0:  # the first block's input norm is the embeddings' (embedding_norm)
                out[f"{bert}attn_norm.{kind}"] = state[f"{ember}input_layernorm.{kind}"]
            out[f"{bert}mlp_norm.{kind}"] = state[f"{ember}post_attention_layernorm.{kind}"]
    return out
