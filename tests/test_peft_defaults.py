"""peft as its users write it for LLaMA: `get_peft_model(model, LoraConfig(task_type=..., r=8))` with no
`target_modules` adapts every attention and MLP projection of an Ember causal LM, classifier or MLM encoder,
whether Ember was imported before or after peft, and for a checkpoint loaded with `trust_remote_code=True` in a
process where Ember's packages cannot be imported (the config file shipped with the checkpoint registers it)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import WITHOUT_EMBER, tiny_config
from peft import LoraConfig, get_peft_model

from modeling import EmberForCausalLM, EmberForMaskedLM, EmberForSequenceClassification
from modeling.configuration_ember import LORA_TARGET_MODULES
from training.finetune import lora_config

HEADS = [(EmberForCausalLM, "CAUSAL_LM", {}), (EmberForSequenceClassification, "SEQ_CLS", {"num_labels": 3}),
         (EmberForMaskedLM, None, {"is_causal": False})]


def adapted(model) -> set[str]:
    """The modules that got a LoRA adapter, by their last name."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("head, task_type, overrides", HEADS, ids=[h.__name__ for h, _, _ in HEADS])
def test_lora_without_target_modules_adapts_every_projection(head, task_type, overrides):
    model = head(tiny_config(**overrides))
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, r=8))
    assert adapted(peft_model) == set(LORA_TARGET_MODULES)
    layers = model.config.num_hidden_layers
    assert sum(hasattr(m, "lora_A") for m in peft_model.modules()) == layers * len(LORA_TARGET_MODULES)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    if task_type == "SEQ_CLS":  # peft trains the new head in full, as for LLaMA's `score`
        assert any(".score." in name for name in trainable)
    assert all("lora_" in name or ".score." in name for name in trainable)
    out = peft_model(input_ids=torch.randint(0, model.config.vocab_size, (1, 8)))
    assert torch.isfinite(out.logits).all()


def test_the_recipes_lora_targets_are_peft_defaults():
    model = EmberForCausalLM(tiny_config())
    assert sorted(lora_config(model, r=4).target_modules) == sorted(LORA_TARGET_MODULES)


REMOTE = WITHOUT_EMBER + textwrap.dedent("""
    import json, sys
    peft_first = sys.argv[2] == "peft-first"
    if peft_first:
        import peft
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification
    auto = {"causal": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification,
            "encoder": AutoModelForMaskedLM}
    tasks = {"causal": "CAUSAL_LM", "classifier": "SEQ_CLS", "encoder": None}
    result = {}
    for kind in ("causal", "classifier", "encoder"):
        model = auto[kind].from_pretrained(f"{sys.argv[1]}/{kind}", trust_remote_code=True)
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(model, LoraConfig(task_type=tasks[kind], r=8))
        result[kind] = sorted({n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")})
    print(json.dumps(result))
""")


@pytest.mark.parametrize("order", ["peft-first", "model-first"])
def test_remote_code_checkpoints_get_the_defaults_without_ember(tmp_path, order):
    for kind, (head, _, overrides) in zip(("causal", "classifier", "encoder"), HEADS):
        head(tiny_config(**overrides)).save_pretrained(tmp_path / kind)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path), order], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    targets = json.loads(result.stdout.strip().splitlines()[-1])
    assert targets == {kind: sorted(LORA_TARGET_MODULES) for kind in ("causal", "classifier", "encoder")}
