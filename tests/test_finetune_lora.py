"""LoRA / QLoRA finetuning (training.finetune, recipes/finetune_lora.py) on tiny models and the data_prep
fixture's tokenizer: response-only labels, adapters that train while the base stays put, merges that
reproduce the adapter model, 4-bit bases on CPU, MoE experts, and the recipe end to end."""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from data_prep.tokenizer import IM_END, load_tokenizer
from modeling import EmberForCausalLM
from modeling.loading import load_model
from recipes import finetune_lora as recipe
from training.finetune import (
    IGNORE_INDEX,
    MOE_EXPERT_PARAMETERS,
    InstructionCollator,
    InstructionDataset,
    add_lora,
    ensure_assistant_mask_template,
    lora_config,
    merge_adapter,
    parameter_counts,
    response_loss,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "recipes" / "configs"
EXAMPLES = [
    {"prompt": "Write a Python function `add(a, b)` that adds two numbers.",
     "response": "def add(a, b):\n    return a + b"},
    {"system": "Answer with code only.", "prompt": "Square x.", "response": "def square(x):\n    return x * x"},
    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "seven"},
                  {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": " two"}]},
    {"prompt": "Return the list reversed.", "response": "def rev(items):\n    return items[::-1]"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def responses_of(record: dict) -> list[str]:
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["response"]]


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return load_tokenizer(data_dir / "tokenizer")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("instructions") / "train.jsonl", EXAMPLES)


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny saved Ember checkpoint with the fixture's tokenizer, as pretraining leaves one."""
    model = tiny_model(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=0.1)  # wide enough an output head that adapters can move the loss
    path = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_briefly(model, dataset, tokenizer, output_dir: Path, steps: int, learning_rate: float) -> Trainer:
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=learning_rate, lr_scheduler_type="constant", use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                             label_names=["labels"], seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=InstructionCollator(tokenizer.pad_token_id))
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------
# Data: labels, truncation, collation
# ---------------------------------------------------------------------------------------------

def test_only_response_tokens_and_their_im_end_carry_labels(tokenizer, train_file):
    dataset = InstructionDataset(train_file, tokenizer, max_length=256)
    assert len(dataset) == len(EXAMPLES) and dataset.stats["truncated"] == 0
    for record, example in zip(EXAMPLES, dataset, strict=True):
        labelled = [label for label in example["labels"] if label != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == "".join(text + IM_END for text in responses_of(record))
        # Labels are the inputs themselves (the model shifts them), so every labelled position matches.
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))
        text = tokenizer.decode(example["input_ids"])
        assert text.startswith("<|im_start|>") and text.endswith(IM_END + "\n")
        first = example["labels"].index(labelled[0])
        assert tokenizer.decode(example["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert "Answer with code only." in tokenizer.decode(dataset[1]["input_ids"])  # the optional system message


def test_truncation_is_counted_and_examples_without_response_tokens_dropped(tokenizer, tmp_path):
    long_prompt = {"prompt": "word " * 80, "response": "short"}
    long_response = {"prompt": "Go.", "response": "again " * 80}
    dataset = InstructionDataset(write_jsonl(tmp_path / "t.jsonl", [long_prompt, long_response, EXAMPLES[3]]),
                                 tokenizer, max_length=60)
    assert dataset.stats["truncated"] == 2 and dataset.stats["dropped_no_response"] == 1
    assert len(dataset) == 2 and all(len(example["input_ids"]) <= 60 for example in dataset)
    assert dataset.stats["response_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in dataset)
    with pytest.raises(ValueError, match=r"t2\.jsonl: no example keeps a response token within max_length=8"):
        InstructionDataset(write_jsonl(tmp_path / "t2.jsonl", [long_prompt]), tokenizer, max_length=8)


def test_special_token_text_in_a_message_is_refused_with_its_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [EXAMPLES[0], {"prompt": "Stop at <|im_end|> please.", "response": "ok"}])
    with pytest.raises(ValueError, match=rf"^{path}:2: prompt contains the special token text '<\|im_end\|>'$"):
        InstructionDataset(path, tokenizer, max_length=96)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a<|endoftext|>"}]}])
    with pytest.raises(ValueError, match=rf"^{path}:1: messages\[1\]\.content contains the special token text"):
        InstructionDataset(path, tokenizer, max_length=96)


def test_collator_pads_on_the_right_with_masked_labels():
    batch = InstructionCollator(pad_token_id=1)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                 {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    padded = InstructionCollator(pad_token_id=1, pad_to_multiple_of=4)([{"input_ids": [5], "labels": [5]}])
    assert padded["input_ids"].tolist() == [[5, 1, 1, 1]] and padded["labels"].tolist() == [[5, -100, -100, -100]]


def test_a_template_without_generation_markers_is_upgraded_or_refused(tokenizer):
    legacy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    legacy.chat_template = ("{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' + "
                            "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor -%}{%- if add_generation_prompt "
                            "-%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    assert "{% generation %}" in ensure_assistant_mask_template(legacy).chat_template
    legacy.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="no {% generation %} block"):
        ensure_assistant_mask_template(legacy)


# ---------------------------------------------------------------------------------------------
# LoRA: only adapters train; merging reproduces the adapter model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_lora(base_dir, tokenizer, train_file, tmp_path_factory):
    dataset = InstructionDataset(train_file, tokenizer, max_length=96)
    model = add_lora(load_model(base_dir), lora_config(EmberForCausalLM.from_pretrained(base_dir), r=8,
                                                              alpha=16, dropout=0.0))
    collator = InstructionCollator(tokenizer.pad_token_id)
    before = response_loss(model, dataset, collator)
    output_dir = tmp_path_factory.mktemp("lora")
    trainer = train_briefly(model, dataset, tokenizer, output_dir, steps=40, learning_rate=3e-2)
    trainer.save_model(output_dir)
    return {"model": model.eval(), "dataset": dataset, "before": before, "adapter_dir": output_dir,
            "after": response_loss(model, dataset, collator), "log": trainer.state.log_history}


def test_lora_trains_the_adapters_only(trained_lora, base_dir):
    model = trained_lora["model"]
    fresh = EmberForCausalLM.from_pretrained(base_dir).state_dict()
    base_weights = {name.replace(".base_layer", ""): tensor for name, tensor in
                    model.get_base_model().state_dict().items() if "lora_" not in name}
    assert base_weights.keys() == fresh.keys()
    assert all(torch.equal(base_weights[name], fresh[name]) for name in fresh)  # bitwise
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter moved
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in EmberForCausalLM.from_pretrained(base_dir).parameters()) \
        + counts["trainable"]
    assert trained_lora["after"]["loss"] < trained_lora["before"]["loss"] - 1.0
    losses = [entry["loss"] for entry in trained_lora["log"] if "loss" in entry]
    assert losses[-1] < losses[0]


def test_merged_model_matches_the_adapter_model_and_reloads_anywhere(trained_lora, base_dir, tokenizer, tmp_path):
    merged_dir = tmp_path / "merged"
    merge_adapter(trained_lora["adapter_dir"], merged_dir, base_model=base_dir, tokenizer=tokenizer)
    assert (trained_lora["adapter_dir"] / "adapter_model.safetensors").is_file()
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ember.EmberForCausalLM"
    assert (merged_dir / "modeling_ember.py").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    batch = InstructionCollator(tokenizer.pad_token_id)([trained_lora["dataset"][i] for i in range(4)])
    with torch.no_grad():
        expected = trained_lora["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = EmberForCausalLM.from_pretrained(base_dir).eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (base - expected).abs().max() > 1e-2  # the adapter changed the model; the merge carried that over


def test_lora_config_names_modules_the_model_has():
    model = tiny_model()
    assert sorted(lora_config(model).target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "gate_proj" not in lora_config(tiny_model(mlp_type="gelu")).target_modules  # GELU MLP: up/down only
    with pytest.raises(ValueError, match=r"lora_target_modules: 'qkv_proj' names no Linear layer"):
        lora_config(model, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="lora_r"):
        lora_config(model, r=0)


# ---------------------------------------------------------------------------------------------
# QLoRA on CPU and MoE experts
# ---------------------------------------------------------------------------------------------

def test_qlora_trains_on_a_4bit_base_and_merges_into_full_precision(base_dir, tokenizer, train_file, tmp_path):
    quantized = load_model(base_dir, load_in_4bit=True)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert quantized.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    model = add_lora(quantized, lora_config(quantized, r=8, alpha=16, dropout=0.0))
    counts = parameter_counts(model)
    full = sum(p.numel() for p in EmberForCausalLM.from_pretrained(base_dir).parameters())
    assert counts["total"] == full + counts["trainable"]  # 4-bit weights counted as values, not packed bytes
    dataset = InstructionDataset(train_file, tokenizer, max_length=96)
    train_briefly(model, dataset, tokenizer, tmp_path / "run", steps=3, learning_rate=1e-2).save_model(tmp_path / "qa")
    assert (tmp_path / "qa" / "adapter_model.safetensors").is_file()

    merged = merge_adapter(tmp_path / "qa", tmp_path / "merged", base_model=base_dir)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    # merged = full-precision base + (alpha / r) B A: not the 4-bit weights, whose rounding error is far larger.
    base_q = EmberForCausalLM.from_pretrained(base_dir).model.layers[0].self_attn.q_proj.weight
    lora = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    assert delta.abs().max() > 0
    torch.testing.assert_close(q_proj.weight, base_q + delta.detach(), atol=1e-6, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True) is not None


def test_moe_experts_are_adapted_through_target_parameters(tmp_path):
    base = tiny_model(num_local_experts=4, num_experts_per_tok=2)
    base.save_pretrained(tmp_path / "base")
    config = lora_config(base, r=4, alpha=8, dropout=0.0)
    assert sorted(config.target_parameters) == sorted(MOE_EXPERT_PARAMETERS)
    assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # experts are not Linear
    experts_before = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    model = add_lora(base, config).train()
    expert_adapters = [p for name, p in model.named_parameters() if "experts" in name and "lora_" in name]
    assert expert_adapters and all(p.requires_grad for p in expert_adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "experts" in name and "lora_B" in name)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base_model=tmp_path / "base").eval()
    assert not torch.equal(merged.model.layers[0].mlp.experts.gate_up_proj, experts_before)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, model(input_ids=tokens).logits, atol=1e-5, rtol=0)
    reloaded = PeftModel.from_pretrained(EmberForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=tokens).logits, model(input_ids=tokens).logits,
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lora_nano_cpu", "qlora_nano_cpu", "lora_1b_1gpu", "qlora_7b_1gpu"])
def test_recipe_configs_parse_and_name_their_hardware(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# Hardware: ")
    model_args, lora_args, data_args, args = recipe.parse(
        ["--config", str(path), "--use_cpu=true", "--bf16=false", "--tf32=false"])
    assert model_args.load_in_4bit == name.startswith("qlora") and lora_args.merge
    assert Path(data_args.train_file).is_absolute() and data_args.max_length > 0
    assert args.max_steps > 0 or args.num_train_epochs > 0


def test_recipe_end_to_end_writes_adapter_merged_model_and_metrics(base_dir, train_file, tmp_path):
    output_dir = tmp_path / "run"
    code = recipe.main([
        "--config", str(CONFIGS / "lora_nano_cpu.yaml"), f"--model_name_or_path={base_dir}",
        f"--train_file={train_file}", f"--validation_file={train_file}", f"--output_dir={output_dir}",
        "--max_steps=4", "--warmup_steps=0", "--max_length=96", "--learning_rate=1e-2", "--logging_steps=2"])
    assert code == 0
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()
    metrics = json.loads((output_dir / "finetune_metrics.json").read_text())
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert metrics["eval_before"]["tokens"] == metrics["data"]["validation"]["response_tokens"]
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert metrics["data"]["train"]["examples"] == len(EXAMPLES)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged", trust_remote_code=True)
    assert merged.config.vocab_size == EmberForCausalLM.from_pretrained(base_dir).config.vocab_size


def test_recipe_config_errors_are_one_line(base_dir, train_file, tmp_path, capsys):
    bad_line = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], {"prompt": "no response"}])
    cases = [
        (["--lora_rank=4"], "error: lora_rank: unknown key"),
        ([f"--model_name_or_path={tmp_path / 'missing'}"], "error: model_name_or_path: checkpoint folder not found"),
        ([f"--train_file={bad_line}"], f"error: {bad_line}:2: expected a 'messages' list, or 'prompt' and 'response'"),
        ([f"--train_file={tmp_path / 'none.jsonl'}"], "error: train_file: instruction file not found: "
                                                       f"'{tmp_path / 'none.jsonl'}'; write one with python -m "
                                                       "data_prep.instructions"),
        (["--lora_target_modules=[q_proj, fused_qkv]"], "error: lora_target_modules: 'fused_qkv' names no Linear"),
        (["--max_length=4096"], "error: max_length: 4096 exceeds the model's max_position_embeddings 256"),
        (["--lora_r=2.5"], "error: lora_r: expected an integer, got '2.5'"),
        (["--merge=perhaps"], "error: merge: expected a boolean, got 'perhaps'"),
    ]
    for overrides, message in cases:
        argv = ["--config", str(CONFIGS / "lora_nano_cpu.yaml"), f"--model_name_or_path={base_dir}",
                f"--train_file={train_file}", "--validation_file=", f"--output_dir={tmp_path / 'out'}", *overrides]
        assert recipe.main(argv) == 2
        err = capsys.readouterr().err.replace("\r", "\n")  # progress bars share stderr
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), err
        assert "Traceback" not in err
