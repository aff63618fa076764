"""Normalisation placement, DeepNorm, QK-norm, the MLP family and T5's relative position bias: each switch
computes what its paper defines, and every decoder combination keeps the decoder guarantees (causality,
KV cache = full forward, eager = sdpa, packed documents = documents alone)."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_modeling import (
    assert_cache_matches_full_forward,
    assert_causal,
    assert_packed_matches_alone,
    assert_trains,
    random_ids,
)
from transformers.activations import ACT2FN
from transformers.models.t5.modeling_t5 import T5Attention

from modeling import EmberConfig, EmberForCausalLM
from modeling.configuration_ember import MLP_TYPES
from modeling.modeling_ember import EmberMLP, EmberRMSNorm, relative_position_bucket

SWITCHES = {
    "post-norm": dict(norm_placement="post"),
    "sandwich-norm": dict(norm_placement="sandwich"),
    "deepnorm": dict(norm_placement="deepnorm"),
    "qk-norm": dict(qk_norm=True),
    "geglu": dict(mlp_type="geglu"),
    "reglu": dict(mlp_type="reglu"),
    "relu": dict(mlp_type="relu"),
    "swish": dict(mlp_type="swish"),
    "relative": dict(position_embedding_type="relative", relative_attention_num_buckets=8,
                     relative_attention_max_distance=16),
    "bert-like-decoder": dict(norm_placement="post", norm_type="layernorm", mlp_type="gelu", qk_norm=True,
                              position_embedding_type="learned", attention_bias=True, mlp_bias=True),
    "t5-like-decoder": dict(norm_placement="sandwich", mlp_type="geglu", qk_norm=True,
                            position_embedding_type="relative", relative_attention_num_buckets=8,
                            relative_attention_max_distance=16),
    "deepnorm-moe-reglu": dict(norm_placement="deepnorm", mlp_type="reglu", num_local_experts=4),
}
switch_params = pytest.mark.parametrize("overrides", list(SWITCHES.values()), ids=list(SWITCHES))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@switch_params
def test_causality_holds_for_every_switch(overrides):
    assert_causal(tiny_model(**overrides))


@switch_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_equals_full_forward_for_every_switch(overrides, attn):
    assert_cache_matches_full_forward(tiny_model(attn_implementation=attn, **overrides), prompt=5)


@switch_params
def test_eager_sdpa_agree_and_packed_documents_stay_apart(overrides):
    eager = assert_packed_matches_alone(tiny_model(attn_implementation="eager", **overrides))
    sdpa = assert_packed_matches_alone(tiny_model(attn_implementation="sdpa", **overrides))
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["post-norm", "qk-norm", "t5-like-decoder"])
def test_switches_train_with_falling_loss(name):
    assert_trains(tiny_model(**SWITCHES[name]))


def layer_outputs(model, ids):
    with torch.no_grad():  # after each block; the last one is reported after the final norm (if any)
        return model(input_ids=ids, output_hidden_states=True).hidden_states[1:]


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_post_norm_blocks_end_normalised_and_pre_norm_blocks_do_not(norm_type):
    ids = random_ids()
    for hidden in layer_outputs(tiny_model(norm_placement="post", norm_type=norm_type), ids):
        if norm_type == "rmsnorm":
            torch.testing.assert_close(hidden.pow(2).mean(-1), torch.ones(hidden.shape[:-1]), rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(hidden.mean(-1), torch.zeros(hidden.shape[:-1]), rtol=0, atol=1e-5)
            torch.testing.assert_close(hidden.var(-1, unbiased=False), torch.ones(hidden.shape[:-1]),
                                       rtol=1e-3, atol=1e-3)
    pre = layer_outputs(tiny_model(norm_placement="pre", norm_type=norm_type), ids)[0]
    assert (pre.pow(2).mean(-1) - 1).abs().max() > 0.1
    post = tiny_model(norm_placement="post", norm_type=norm_type).model
    assert isinstance(post.norm, torch.nn.Identity)  # the last block already ends in a norm


def test_sandwich_norm_normalises_each_branch_output_before_the_residual_add():
    model = tiny_model(norm_placement="sandwich")
    layer = model.model.layers[0]
    captured = {}
    layer.attention_output_layernorm.register_forward_hook(lambda m, i, o: captured.update(attn=(i[0], o)))
    layer.mlp_output_layernorm.register_forward_hook(lambda m, i, o: captured.update(mlp=(i[0], o)))
    with torch.no_grad():
        model(input_ids=random_ids())
    for branch_in, branch_out in captured.values():
        assert (branch_in.pow(2).mean(-1) - 1).abs().max() > 0.5  # the raw branch output is far from unit scale
        torch.testing.assert_close(branch_out, branch_in / branch_in.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    assert isinstance(model.model.norm, EmberRMSNorm)


@pytest.mark.parametrize("layers", [2, 6, 24])
def test_deepnorm_constants_follow_wang_et_al_2022(layers):
    config = tiny_config(norm_placement="deepnorm", num_hidden_layers=layers)
    assert config.deepnorm_alpha == pytest.approx((2 * layers) ** 0.25)
    assert config.deepnorm_beta == pytest.approx((8 * layers) ** -0.25)


def test_deepnorm_block_is_norm_of_alpha_residual_plus_branch_and_init_is_scaled_by_beta():
    overrides = dict(norm_placement="deepnorm", num_hidden_layers=6, hidden_size=128, intermediate_size=256,
                     position_embedding_type="learned")
    model = tiny_model(attn_implementation="eager", **overrides)
    config, layer = model.config, model.model.layers[0]
    alpha, beta = config.deepnorm_alpha, config.deepnorm_beta
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        h = layer.post_attention_layernorm(alpha * x + layer.self_attn(x, attention_mask=None)[0])
        expected = layer.post_mlp_layernorm(alpha * h + layer.mlp(h))
        torch.testing.assert_close(layer(x, attention_mask=None), expected, rtol=1e-5, atol=1e-5)
    std = config.initializer_range
    for name in ("q_proj", "k_proj"):
        assert getattr(layer.self_attn, name).weight.std().item() == pytest.approx(std, rel=0.05)
    for weight in (layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight,
                   layer.mlp.up_proj.weight, layer.mlp.down_proj.weight):
        assert weight.std().item() == pytest.approx(std * beta, rel=0.05)


def test_qk_norm_normalises_queries_and_keys_per_head():
    model = tiny_model(qk_norm=True)
    attention = model.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (16,) and attention.k_norm.weight.shape == (16,)
    captured = []
    for norm in (attention.q_norm, attention.k_norm):
        norm.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
    with torch.no_grad():
        with_norm = model(input_ids=random_ids()).logits
    (q_in, q_out), (k_in, k_out) = captured
    assert q_in.shape == (2, 16, 4, 16) and k_in.shape == (2, 16, 2, 16)  # (batch, seq, heads, head_dim)
    for raw, normed in ((q_in, q_out), (k_in, k_out)):
        torch.testing.assert_close(normed, raw / raw.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    without = tiny_model()  # the same seed gives the same projections: only the norm differs
    with torch.no_grad():
        assert (without(input_ids=random_ids()).logits - with_norm).abs().max() > 1e-3


@pytest.mark.parametrize("mlp_type", list(MLP_TYPES))
def test_mlp_types_compute_their_formula(mlp_type):
    config = tiny_config(mlp_type=mlp_type)
    gated, activation = MLP_TYPES[mlp_type]
    assert config.hidden_act == activation and config.is_gated_mlp == gated
    mlp = EmberMLP(config)
    x = torch.randn(3, 64)
    act = ACT2FN[activation]
    with torch.no_grad():
        inner = act(mlp.gate_proj(x)) * mlp.up_proj(x) if gated else act(mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), mlp.down_proj(inner))
    assert hasattr(mlp, "gate_proj") == gated


@pytest.mark.parametrize("bidirectional", [False, True])
def test_relative_buckets_match_t5(bidirectional):
    offsets = torch.arange(-300, 301)[None, :]
    for buckets, distance in ((32, 128), (8, 16)):
        ours = relative_position_bucket(offsets, bidirectional, buckets, distance)
        reference = T5Attention._relative_position_bucket(offsets, bidirectional, buckets, distance)
        assert torch.equal(ours, reference)


def test_relative_bias_is_one_table_shared_by_all_layers():
    model = tiny_model(attn_implementation="eager", position_embedding_type="relative", num_hidden_layers=3,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
    tables = [name for name, _ in model.named_parameters() if "relative" in name]
    assert tables == ["model.relative_position_bias.embedding.weight"]
    assert model.model.relative_position_bias.embedding.weight.shape == (8, 4)  # buckets x heads
    masks = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    ids = random_ids(length=10)
    with torch.no_grad():
        model(input_ids=ids)
    assert len(masks) == 3 and all(mask is masks[0] for mask in masks)
    # the mask holds the causal mask plus bias[head, bucket(key - query)]
    bias = model.model.relative_position_bias.embedding.weight
    buckets = relative_position_bucket(torch.arange(10)[None, :] - torch.arange(10)[:, None], False, 8, 16)
    expected = bias[buckets].permute(2, 0, 1)
    allowed = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    torch.testing.assert_close(masks[0][0][:, allowed], expected[:, allowed])
    assert (masks[0][0][:, ~allowed] < -1e30).all()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(norm_placement="middle"), "norm_placement"),
        (dict(hidden_act="swoosh"), "hidden_act"),
        (dict(mlp_type="gelu", num_local_experts=2), "mlp_type"),
        (dict(is_causal=False, use_cache=True), "use_cache"),
        (dict(position_embedding_type="relative", sliding_window=4), "sliding_window"),
        (dict(position_embedding_type="relative", relative_attention_num_buckets=3, is_causal=False),
         "relative_attention_num_buckets"),
        (dict(position_embedding_type="relative", relative_attention_num_buckets=32,
              relative_attention_max_distance=16), "relative_attention_max_distance"),
    ],
)
def test_invalid_switch_combinations_raise_one_line_errors(overrides, field):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**overrides)
    assert str(excinfo.value).startswith(f"{field}:") and "\n" not in str(excinfo.value)


def test_backends_and_heads_that_cannot_serve_a_config_are_refused():
    with pytest.raises(ValueError, match=r"^attn_implementation: .*relative"):
        tiny_model(attn_implementation="flex_attention", position_embedding_type="relative")
    with pytest.raises(ValueError, match="^is_causal: EmberForCausalLM"):
        EmberForCausalLM(tiny_config(is_causal=False))
    assert EmberConfig(is_causal=False).use_cache is False and EmberConfig().use_cache is True
