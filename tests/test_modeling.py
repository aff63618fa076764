"""Behaviour of EmberConfig / EmberForCausalLM on tiny CPU configs."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_EMBER, tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modeling import EmberConfig, EmberForCausalLM
from modeling.modeling_ember import EmberTopKRouter, alibi_slopes

VARIANTS = {
    "llama-gqa": {},
    "mqa": dict(num_key_value_heads=1),
    "mha": dict(num_key_value_heads=4),
    "head-dim-24": dict(head_dim=24),
    "alibi": dict(position_embedding_type="alibi"),
    "learned": dict(position_embedding_type="learned"),
    "sinusoidal": dict(position_embedding_type="sinusoidal"),
    "gpt2-style": dict(
        position_embedding_type="learned", norm_type="layernorm", mlp_type="gelu",
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, num_key_value_heads=4,
    ),
    "sliding-window": dict(sliding_window=5),
    "moe": dict(num_local_experts=4, num_experts_per_tok=2),
}
variant_params = pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))


def random_ids(batch: int = 2, length: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@variant_params
def test_shapes_and_dtypes(overrides):
    model = tiny_model(**overrides)
    ids = random_ids()
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 16, 128)
    assert out.logits.dtype == torch.float32
    model = model.to(torch.bfloat16)
    out = model(input_ids=ids)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()
    last = model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 128)


def assert_causal(model) -> None:
    """Changing token 9 leaves the logits before it untouched and changes those from it on."""
    ids = random_ids()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 128
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


def assert_cache_matches_full_forward(model, prompt: int = 4) -> None:
    """Decoding token by token with a KV cache gives the logits of one full forward."""
    ids = random_ids(length=14)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def assert_packed_matches_alone(model) -> torch.Tensor:
    """Documents packed in one row (positions restarting) give the logits they get alone; returns the packed logits."""
    lengths = [5, 7, 4]
    docs = [random_ids(batch=1, length=n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():  # no cache: transformers reads document boundaries from position_ids only without one
        packed_logits = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-5)
    return packed_logits


@variant_params
def test_causality_future_tokens_do_not_change_past_logits(overrides):
    assert_causal(tiny_model(**overrides))


@pytest.mark.parametrize("name", ["llama-gqa", "alibi", "sliding-window", "moe", "gpt2-style"])
def test_eager_and_sdpa_agree(name):
    ids = random_ids()
    eager = tiny_model(attn_implementation="eager", **VARIANTS[name])
    sdpa = tiny_model(attn_implementation="sdpa", **VARIANTS[name])
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, sdpa(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "sliding-window"])
def test_flex_attention_agrees_with_eager(name):
    ids = random_ids()
    eager = tiny_model(attn_implementation="eager", **VARIANTS[name])
    flex = tiny_model(attn_implementation="flex_attention", **VARIANTS[name])
    with torch.no_grad():  # flex attention has no CPU backward
        torch.testing.assert_close(eager(input_ids=ids).logits, flex(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "mqa", "alibi", "learned", "sinusoidal", "sliding-window", "moe"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_incremental_decoding_equals_full_forward(name, attn):
    assert_cache_matches_full_forward(tiny_model(attn_implementation=attn, **VARIANTS[name]))


def test_gqa_and_mqa_have_fewer_kv_weights():
    for kv_heads in (4, 2, 1):
        attn = tiny_model(num_key_value_heads=kv_heads).model.layers[0].self_attn
        assert attn.k_proj.weight.shape == (kv_heads * 16, 64)
        assert attn.q_proj.weight.shape == (64, 64)
        assert attn.num_key_value_groups == 4 // kv_heads


def assert_trains(model) -> None:
    """25 AdamW steps on a repeating pattern at least halve the loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.arange(32) % 11  # a learnable repeating sequence
    batch = torch.stack([pattern, (pattern + 3) % 11])
    losses = []
    for _ in range(25):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@variant_params
def test_each_switch_trains_with_falling_loss(overrides):
    assert_trains(tiny_model(**overrides))


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ],
    ids=lambda p: p["rope_type"],
)
def test_rope_scaling_types_build_run_and_round_trip(rope_parameters, tmp_path):
    model = tiny_model(rope_parameters=dict(rope_parameters), max_position_embeddings=64)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == rope_parameters["rope_type"]
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    if rope_parameters["rope_type"] == "linear":
        torch.testing.assert_close(rotary.inv_freq, default / 2.0)
    with torch.no_grad():
        logits = model(input_ids=random_ids(length=96)).logits  # longer than max_position_embeddings
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = EmberForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.rope_parameters["rope_type"] == rope_parameters["rope_type"]
    # dynamic NTK rescales inv_freq after a long input; the pre-scaling table is what must round-trip
    torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq, rotary.original_inv_freq)


def test_gradient_checkpointing_gives_same_gradients():
    ids = random_ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=3).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_moe_routes_top_k_and_adds_aux_loss():
    model = tiny_model(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1)
    ids = random_ids()
    router = model.model.layers[0].mlp.gate
    assert isinstance(router, EmberTopKRouter)
    hidden = torch.randn(32, 64)
    logits, weights, index = router(hidden)
    assert logits.shape == (32, 4) and index.shape == (32, 2)
    assert (index[:, 0] != index[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))

    with torch.no_grad():
        lm_only = model(input_ids=ids, labels=ids).loss  # eval: pure LM loss
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (32, 4)
    torch.testing.assert_close(out.loss, lm_only + 0.1 * out.aux_loss)
    out.loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["llama-gqa", "alibi", "learned", "sinusoidal", "sliding-window", "moe"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_match_documents_run_alone(name, attn):
    assert_packed_matches_alone(tiny_model(attn_implementation=attn, **VARIANTS[name]))


def test_gradient_accumulation_matches_big_batch():
    ids = random_ids(batch=4, length=12)
    labels = ids.clone()
    labels[0, 6:] = -100  # uneven numbers of target tokens per micro-batch
    labels[3, 2:] = -100
    num_items = int((labels[:, 1:] != -100).sum())

    big = tiny_model(seed=5).train()
    big(input_ids=ids, labels=labels).loss.backward()

    accum = tiny_model(seed=5).train()
    for rows in (slice(0, 2), slice(2, 4)):
        accum(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss.backward()
    for (name, p_big), (_, p_acc) in zip(big.named_parameters(), accum.named_parameters()):
        torch.testing.assert_close(p_big.grad, p_acc.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-style", "moe"])
def test_save_load_round_trip(name, tmp_path):
    model = tiny_model(**VARIANTS[name])
    ids = random_ids()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "ember"
    assert set(saved["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (tmp_path / "configuration_ember.py").exists() and (tmp_path / "modeling_ember.py").exists()
    loaded_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is EmberForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


REMOTE_LOAD = WITHOUT_EMBER + textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    path = sys.argv[1]
    expected = torch.load(path + "/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    generated = model.generate(expected["ids"][:, :4], max_new_tokens=6, do_sample=True, top_k=20)
    print(json.dumps({
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "base_class": type(base).__name__,
        "config_class": type(config).__name__,
        "max_diff": (logits - expected["logits"]).abs().max().item(),
        "generated_shape": list(generated.shape),
        "ember_loaded": any(m.split(".")[0] == "modeling" for m in sys.modules),
    }))
    """
)


def test_remote_code_loads_in_fresh_process_without_ember(tmp_path):
    model = tiny_model(**VARIANTS["sliding-window"])
    ids = random_ids()
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ckpt" / "expected.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "ckpt")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("EmberForCausalLM")
    assert report["base_class"] == "EmberModel" and report["config_class"] == "EmberConfig"
    assert report["max_diff"] <= 1e-6
    assert report["generated_shape"] == [2, 10]
    assert not report["ember_loaded"]


def test_llama_compatible_module_names_match_stock_llama():
    config = tiny_config()
    ember_keys = set(EmberForCausalLM(config).state_dict())
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        )
    )
    assert ember_keys == set(llama.state_dict())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(mlp_type="maxout"), "mlp_type"),
        (dict(position_embedding_type="xpos"), "position_embedding_type"),
        (dict(rope_parameters={"rope_type": "wavy", "rope_theta": 1.0}), "rope_parameters"),
        (dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(num_local_experts=2, mlp_bias=True), "mlp_bias"),
        (dict(position_embedding_type="alibi", sliding_window=8), "sliding_window"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(head_dim=15), "head_dim"),
    ],
)
def test_invalid_configs_raise_one_line_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**overrides)
    message = str(excinfo.value)
    assert message.startswith(field) and "\n" not in message


def test_alibi_rejects_backends_without_bias():
    with pytest.raises(ValueError, match=r"^attn_implementation: .*alibi") as excinfo:
        tiny_model(attn_implementation="flex_attention", position_embedding_type="alibi")
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="^preset"):
        EmberConfig.from_preset("13b")


def test_alibi_slopes_follow_the_geometric_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # 4 from the power-of-two sequence, 2 interleaved from the 8-head one
    torch.testing.assert_close(six[:4], alibi_slopes(4))
    torch.testing.assert_close(six[4:], alibi_slopes(8)[0::2][:2])


def test_learned_positions_reject_sequences_past_the_table():
    model = tiny_model(position_embedding_type="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="^max_position_embeddings"):
        model(input_ids=random_ids(length=17))


@pytest.mark.parametrize("name", ["llama-gqa", "alibi", "moe"])
def test_generate_with_sampling_and_greedy_cache_consistency(name):
    model = tiny_model(**VARIANTS[name])
    prompt = random_ids(length=5)
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True,
        temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0,
    )
    assert sampled.shape == (2, 13) and (sampled[:, :5] == prompt).all()
    assert sampled.min() >= 0 and sampled.max() < 128
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **greedy)
    without_cache = model.generate(prompt, use_cache=False, **greedy)
    assert torch.equal(with_cache, without_cache)
