"""CUDA-only checks (run with `make test-gpu` on a GPU machine; deselected by `make test`)."""

import importlib.util

import pytest
import torch
from conftest import tiny_model

pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")


def cuda_model(attn: str, **overrides):
    return tiny_model(attn_implementation=attn, hidden_size=128, num_attention_heads=4, **overrides).to(
        "cuda", torch.bfloat16
    )


@requires_cuda
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8}, {"position_embedding_type": "alibi"}])
def test_bf16_sdpa_matches_eager_on_cuda(overrides):
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        eager = cuda_model("eager", **overrides)(input_ids=ids).logits.float()
        sdpa = cuda_model("sdpa", **overrides)(input_ids=ids).logits.float()
    torch.testing.assert_close(sdpa, eager, rtol=2e-2, atol=2e-2)


@requires_cuda
def test_bf16_training_step_is_finite_on_cuda():
    model = cuda_model("sdpa").train()
    ids = torch.randint(0, 128, (4, 128), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@requires_cuda
@requires_flash
def test_flash_attention_packed_documents_match_documents_alone():
    model = cuda_model("flash_attention_2")
    lengths = [17, 30, 11]
    docs = [torch.randint(0, 128, (1, n), device="cuda") for n in lengths]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(docs, 1), position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs], 1)
    torch.testing.assert_close(packed.float(), alone.float(), rtol=2e-2, atol=2e-2)


@requires_cuda
def test_sdpa_runs_on_the_flash_or_cudnn_kernels_for_causal_batches():
    # Restricted to these backends, sdpa raises instead of falling back to the math or efficient kernels:
    # a plain causal batch (no padding, no document positions) must reach a fused causal kernel.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = cuda_model("sdpa").train()
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    reference = model(input_ids=ids, labels=ids, use_cache=False).loss
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-2, atol=1e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@requires_cuda
def test_activation_checkpointing_cuts_activation_memory_on_cuda():
    def activation_peak(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = tiny_model(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=1024).to("cuda", torch.bfloat16).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 128, (8, 1024), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    without, with_checkpointing = activation_peak(False), activation_peak(True)
    assert with_checkpointing < 0.6 * without, (with_checkpointing, without)


@requires_cuda
def test_qlora_trains_a_4bit_base_on_cuda(tmp_path):
    import bitsandbytes as bnb

    from modeling.loading import load_model
    from training.finetune import add_lora, lora_config

    tiny_model(hidden_size=128, num_attention_heads=4).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.device.type == "cuda"
    assert q_proj.weight.quant_type == "nf4" and q_proj.compute_dtype == torch.bfloat16
    model = add_lora(model, lora_config(model, r=8, alpha=16, dropout=0.0)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for _ in range(20):  # one fixed batch: the adapters must be able to fit it
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses


def cuda_encoder(attn: str, **overrides):
    from modeling import EmberForMaskedLM

    torch.manual_seed(0)
    config = tiny_model(hidden_size=128, num_attention_heads=4, **overrides).config
    config.is_causal, config.use_cache = False, False
    return EmberForMaskedLM._from_config(config, attn_implementation=attn).to("cuda", torch.bfloat16).eval()


@requires_cuda
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention",
                                  pytest.param("flash_attention_2", marks=requires_flash)])
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 8}], ids=["full", "sliding-window"])
def test_encoder_backends_keep_packed_documents_apart_on_cuda(attn, overrides):
    eager = cuda_encoder("eager", **overrides)
    other = cuda_encoder(attn, **overrides)
    lengths = [17, 30, 17]
    docs = [torch.randint(0, 128, (1, n), device="cuda") for n in lengths]
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        reference = torch.cat([eager(input_ids=d).logits for d in docs], 1).float()
        packed = other(input_ids=torch.cat(docs, 1), position_ids=position_ids).logits.float()
    torch.testing.assert_close(packed, reference, rtol=3e-2, atol=3e-2)
