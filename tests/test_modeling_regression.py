"""Regression pins: today's configs and checkpoints compute the same logits after every architecture change.

The numbers below were computed once with the pre-switch modeling code (pre-norm only, SwiGLU/GELU MLPs,
causal decoder only) at a fixed seed; the tiny checkpoints under tests/data/checkpoints_v0 were written by
that code's `save_pretrained`.
"""

import pytest
import torch
from conftest import REPO_ROOT, tiny_model
from test_modeling import VARIANTS, random_ids
from transformers import AutoModelForCausalLM

from modeling import EmberForCausalLM

# variant -> (sum of logits, sum of |logits|, logits[0, -1, :3]) for tiny_model(seed=0) on random_ids()
PINNED = {
    "llama-gqa": (-8.8885, 528.5855, [0.12402, 0.0727, -0.16479]),
    "mqa": (9.3987, 531.8909, [-0.05794, -0.13182, 0.01156]),
    "mha": (-38.8294, 533.801, [0.1257, -0.09431, -0.27694]),
    "head-dim-24": (-12.9317, 519.0508, [-0.07909, -0.20437, -0.29477]),
    "alibi": (-11.7017, 522.8924, [0.15454, 0.06393, -0.16468]),
    "learned": (18.921, 504.4243, [0.13819, 0.18245, -0.07992]),
    "sinusoidal": (-91.118, 499.6535, [-0.12785, 0.06183, 0.16132]),
    "gpt2-style": (28.5438, 539.8849, [0.16223, -0.07955, -0.19296]),
    "sliding-window": (-12.3027, 516.2635, [0.22176, 0.07742, -0.21378]),
    "moe": (14.1483, 527.4688, [0.10636, -0.17152, -0.04527]),
}

# checkpoint -> logits[0, :, 0] and the sum of all logits for ids [[12, 15, 21, 0, 3, 27, 3, 7]]
CHECKPOINT_IDS = torch.tensor([[12, 15, 21, 0, 3, 27, 3, 7]])
CHECKPOINTS = {
    "llama": ([0.054803, -0.019906, 0.048909, 0.003762, -0.055808, 0.069758, -0.054302, -0.066357], 0.84835),
    "gpt2": ([-0.100339, 0.009496, 0.0302, 0.280803, 0.037336, 0.068866, 0.163637, -0.042898], 2.1403),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_default_switches_keep_pinned_logits(name, one_torch_thread):
    model = tiny_model(seed=0, **VARIANTS[name])
    with torch.no_grad():
        logits = model(input_ids=random_ids()).logits.double()
    total, absolute, head = PINNED[name]
    assert logits.sum().item() == pytest.approx(total, abs=2e-3)
    assert logits.abs().sum().item() == pytest.approx(absolute, abs=2e-3)
    torch.testing.assert_close(logits[0, -1, :3].float(), torch.tensor(head), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoints_saved_before_the_switches_load_with_identical_logits(name, one_torch_thread):
    path = REPO_ROOT / "tests" / "data" / "checkpoints_v0" / name
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model) is EmberForCausalLM
    with torch.no_grad():
        logits = model(input_ids=CHECKPOINT_IDS).logits
    column, total = CHECKPOINTS[name]
    torch.testing.assert_close(logits[0, :, 0], torch.tensor(column), rtol=0, atol=2e-6)
    assert logits.double().sum().item() == pytest.approx(total, abs=1e-4)
