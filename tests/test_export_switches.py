"""Every architecture switch of `EmberConfig`, one at a time, through both exports: `to-hf` gives a stock class
with the same logits, `to-gguf` a file llama.cpp runs with the same logits, or each refuses in one line that
starts with the `EmberConfig` field and names its value, never a tensor."""

import dataclasses
import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from modeling import EmberConfig, EmberForCausalLM, EmberForMaskedLM
from modeling.convert import to_hf
from modeling.gguf import to_gguf

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ROPE = {"rope_theta": 1e4, "original_max_position_embeddings": 16}
# field -> the values other than the default each switch can take (a RoPE type, with its parameters).
SWITCHES = {
    "position_embedding_type": ["alibi", "learned", "sinusoidal", "relative"],
    "rope_parameters": [{"rope_type": "linear", "factor": 2.0, **ROPE}, {"rope_type": "dynamic", "factor": 2.0, **ROPE},
                        {"rope_type": "yarn", "factor": 4.0, **ROPE},
                        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         **ROPE}],
    "relative_attention_num_buckets": [16],
    "relative_attention_max_distance": [32],
    "is_causal": [False],
    "norm_type": ["layernorm"],
    "norm_eps": [1e-5],
    "norm_placement": ["post", "sandwich", "deepnorm"],
    "qk_norm": [True],
    "embedding_norm": [True],
    "mlp_type": ["geglu", "reglu", "gelu", "relu", "swish"],
    "hidden_act": ["gelu", "relu"],
    "sliding_window": [8],
    "attention_bias": [True],
    "mlp_bias": [True],
    "attention_dropout": [0.1],
    "hidden_dropout": [0.1],
    "tie_word_embeddings": [True],
    "num_key_value_heads": [1],
    "head_dim": [32],
    "num_local_experts": [4],
    "classifier_pooling": ["mean"],
}
# An encoder built as ModernBERT is (it exports as ModernBertForMaskedLM), and its switches walked the same way.
MODERNBERT = dict(is_causal=False, embedding_norm=True, mlm_head_transform=True, norm_type="layernorm",
                  mlp_type="geglu", hidden_act="gelu", num_key_value_heads=4)
ENCODER_SWITCHES = {
    "embedding_norm": [False], "mlm_head_transform": [False], "norm_type": ["rmsnorm"],
    "norm_placement": ["post", "sandwich"], "position_embedding_type": ["learned", "alibi"], "qk_norm": [True],
    "sliding_window": [8], "mlp_type": ["gelu", "swiglu"], "hidden_act": ["silu"], "num_key_value_heads": [2],
    "head_dim": [32], "rope_parameters": [{"rope_type": "linear", "factor": 2.0, **ROPE}],
    "attention_bias": [True], "mlp_bias": [True], "tie_word_embeddings": [True], "hidden_dropout": [0.1],
}
# Sizes, ids and training-only settings: not switches between architectures.
NOT_SWITCHES = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "initializer_range", "use_cache", "pad_token_id", "bos_token_id",
                "eos_token_id", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
                "mlm_head_transform"}  # an encoder's switch: walked in ENCODER_SWITCHES
CASES = [pytest.param(field, value, id=f"{field}={value['rope_type'] if isinstance(value, dict) else value}")
         for field, values in SWITCHES.items() for value in values]


def test_the_walk_covers_every_field():
    """A field added to EmberConfig joins the walk, or is listed as no switch."""
    own = {f.name for f in dataclasses.fields(EmberConfig) if f.name in EmberConfig.__annotations__}
    assert set(SWITCHES) | NOT_SWITCHES == own, sorted(own ^ (set(SWITCHES) | NOT_SWITCHES))
    assert "mlm_head_transform" in ENCODER_SWITCHES


def model_with(field: str, value, base: dict | None = None):
    """A model of the nano shape (over `base`) with one switch changed (an encoder for is_causal=False), with
    weights larger than an initialisation, so biases and norms count."""
    config = EmberConfig.from_preset("nano", **{**TINY, **(base or {}), field: value})
    model = (EmberForCausalLM if config.is_causal else EmberForMaskedLM)(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1.0 if "norm" in name else noise * 2)
    return model.eval()


def assert_named_refusal(error: ValueError, field: str, value) -> None:
    message = str(error)
    if field == "is_causal" and not message.startswith("is_causal"):
        # An encoder is exported as ModernBERT; a LLaMA-like one is refused on the first setting ModernBERT lacks.
        field = message.split(":")[0]
        assert field in MODERNBERT, message
        value = EmberConfig.from_preset("nano", **{**TINY, "is_causal": False}).to_dict()[field]
    shown = value["rope_type"] if isinstance(value, dict) else value
    assert message.startswith(f"{field}") and "\n" not in message, message
    assert repr(shown) in message or str(shown) in message, message
    assert "model.layers" not in message and ".weight" not in message, message


IDS = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))


def exported_to_hf(model, tmp_path: Path, field: str, value) -> bool:
    """`to-hf` on the saved `model`: True when it exported, False when it refused (in one line naming the setting)."""
    model.save_pretrained(tmp_path / "ember")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hidden_dropout and sliding_window warn
            to_hf(tmp_path / "ember", tmp_path / "hf")
    except ValueError as error:
        assert_named_refusal(error, field, value)
        assert not (tmp_path / "hf" / "config.json").exists()
        return False
    return True


@pytest.mark.parametrize("field, value", CASES)
def test_to_hf_exports_or_names_the_setting(tmp_path, field, value):
    model = model_with(field, value)
    if not exported_to_hf(model, tmp_path, field, value):
        return
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert "Ember" not in type(stock).__name__
    with torch.no_grad():
        assert (stock(IDS).logits - model(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("field, value", CASES)
def test_to_gguf_exports_or_names_the_setting(data_dir, tmp_path, field, value):
    model = model_with(field, value)
    model.save_pretrained(tmp_path / "ember")
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(tmp_path / "ember")
    try:
        to_gguf(tmp_path / "ember", tmp_path / "model.gguf", "f32")
    except ValueError as error:
        assert_named_refusal(error, field, value)
        assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".model.gguf*"))
        return
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
                          logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(IDS[0].tolist())
        logits = np.array(llm.scores[: IDS.shape[1]], dtype=np.float64)
    finally:
        llm.close()
    with torch.no_grad():
        expected = model(IDS).logits[0].double().numpy()
    assert np.abs(logits - expected).max() <= 1e-4


ENCODER_CASES = [pytest.param(field, value, id=f"{field}={value['rope_type'] if isinstance(value, dict) else value}")
                 for field, values in ENCODER_SWITCHES.items() for value in values]


@pytest.mark.parametrize("field, value", [pytest.param("is_causal", False, id="modernbert"), *ENCODER_CASES])
def test_an_encoder_exports_as_modernbert_or_names_the_setting(tmp_path, field, value):
    model = model_with(field, value, MODERNBERT)
    if not exported_to_hf(model, tmp_path, field, value):
        return
    stock = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(stock).__name__ == "ModernBertForMaskedLM" and not list((tmp_path / "hf").glob("*.py"))
    mask = torch.ones_like(IDS)
    mask[:, 30:] = 0  # padding: the masked positions of the batch are left out of the comparison
    with torch.no_grad():
        difference = (stock(IDS, attention_mask=mask).logits - model(IDS, attention_mask=mask).logits)[mask.bool()]
    assert difference.abs().max().item() <= 1e-5
