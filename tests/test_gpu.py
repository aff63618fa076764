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
