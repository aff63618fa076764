"""torch.compile of Ember's training step: forward and loss trace into one graph with no graph break (dense and
MoE, packed rows with per-document positions), so `torch_compile: true` compiles the whole step, and the compiled
step's loss and gradients are the eager ones. Compile time and speed are measured in benchmarks/bench_compile_cpu.py."""

import pytest
import torch
from conftest import tiny_model

from training.trainer import prepare_for_compile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def training_step(model):
    def step(input_ids, shift_labels, position_ids):
        return model(input_ids=input_ids, labels=shift_labels, shift_labels=shift_labels,
                     position_ids=position_ids).loss
    return step


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_training_step_compiles_in_one_graph_with_no_break(moe):
    overrides = {"num_local_experts": 4, "num_experts_per_tok": 2} if moe else {}
    model, reference = tiny_model(**overrides).train(), tiny_model(**overrides).train()
    for m in (model, reference):
        m.config.use_cache = False  # as in training: no KV cache, so attention stops at document boundaries
    prepare_for_compile(model)
    ids = torch.randint(0, 128, (2, 32))
    labels = torch.roll(ids, -1, dims=1)
    positions = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32)  # two documents packed in a row
    torch._dynamo.reset()
    explained = torch._dynamo.explain(training_step(model))(ids, labels, positions)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    reference.load_state_dict(model.state_dict())
    eager_loss = training_step(reference)(ids, labels, positions)
    eager_loss.backward()
    # fullgraph=True raises on any break; aot_eager runs forward and backward through AOTAutograd's graphs
    # without generating kernels, so the test is quick.
    compiled = torch.compile(training_step(model), fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels, positions)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
