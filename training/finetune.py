"""LoRA and QLoRA finetuning of Ember checkpoints on instruction data, with peft and bitsandbytes.

The pieces `recipes/finetune_lora.py` glues to the HF Trainer:

- Instruction data. A jsonl file of `{"prompt", "response"}` (optional `"system"`) or
  `{"messages": [{"role", "content"}, ...]}` records. Each conversation is rendered with the tokenizer's
  ChatML template; the labels are -100 everywhere except on assistant tokens, the closing `<|im_end|>`
  included so the model learns where to stop. The mask comes from the template's `{% generation %}`
  block (`apply_chat_template(..., return_assistant_tokens_mask=True)`). A bad line is a ValueError
  naming `file:line` and the field.
- LoRA (Hu et al. 2021) through peft on the attention and MLP projections; the experts of an MoE model
  are 3D parameters, not Linear modules, and take peft's `target_parameters`.
- QLoRA (Dettmers et al. 2023): the base loaded in 4-bit NF4 with double quantization through
  transformers' `BitsAndBytesConfig`, prepared with `prepare_model_for_kbit_training`, then LoRA.
- Merging: the adapter is folded into a full-precision reload of the base (never into 4-bit weights)
  and saved as a plain Ember checkpoint that loads with `AutoModelForCausalLM` like any other.
- `response_loss`: mean loss on response tokens only, the before/after number of a finetuning run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from cli import honour_umask
from data_prep.tokenizer import CHAT_TEMPLATE, IM_END
from evaluation.perplexity import perplexity
from modeling import IGNORE_INDEX
from modeling.configuration_ember import LORA_TARGET_MODULES
from modeling.loading import adapter_base, load_model
from modeling.tokenizer_config import make_portable
from training.callbacks import use_log_lines
from training.checkpoints import ReadableSavesMixin
from training.muon import OptimizerChoiceMixin

ROLES = ("system", "user", "assistant")
# EmberExperts keeps all experts of a layer in two 3D parameters (Mixtral's layout).
MOE_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_PROBE_CONVERSATION = [{"role": "system", "content": "s"}, {"role": "user", "content": "u\n"},
                       {"role": "assistant", "content": " a"}]


# ---------------------------------------------------------------------------------------------
# Instruction data
# ---------------------------------------------------------------------------------------------

def _check_text(value: Any, where: str, field: str, forbidden: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field} must be a string, got {type(value).__name__}")
    found = next((token for token in forbidden if token in value), None)
    if found:  # the tokenizer would read it as the control token, not as text
        raise ValueError(f"{where}: {field} contains the special token text {found!r}")
    return value


def conversation_from_record(record: Any, where: str, forbidden: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The messages of one jsonl record (`messages`, or `prompt`/`response` with an optional `system`).

    `forbidden` lists texts no message may contain: the tokenizer's special tokens."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: messages must be a non-empty list")
        conversation = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"{where}: messages[{i}] must be an object with role and content")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"{where}: messages[{i}].role must be one of {ROLES}, got {role!r}")
            if role == "system" and i != 0:
                raise ValueError(f"{where}: messages[{i}].role: a system message may only come first")
            content = _check_text(message.get("content"), where, f"messages[{i}].content", forbidden)
            conversation.append({"role": role, "content": content})
        if not any(message["role"] == "assistant" for message in conversation):
            raise ValueError(f"{where}: messages has no assistant message (nothing to learn)")
        return conversation
    if "prompt" not in record or "response" not in record:
        raise ValueError(f"{where}: expected a 'messages' list, or 'prompt' and 'response' fields")
    conversation = [{"role": "user", "content": _check_text(record["prompt"], where, "prompt", forbidden)},
                    {"role": "assistant", "content": _check_text(record["response"], where, "response", forbidden)}]
    if record.get("system") is not None:
        conversation.insert(0, {"role": "system", "content": _check_text(record["system"], where, "system", forbidden)})
    return conversation


def read_conversations(path: str | Path, forbidden: tuple[str, ...] = ()) -> list[tuple[str, list[dict[str, str]]]]:
    """(`file:line`, messages) for every non-blank line of an instruction jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: instruction file not found")
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            conversations.append((where, conversation_from_record(record, where, forbidden)))
    return conversations


def ensure_assistant_mask_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure the chat template marks assistant tokens (`{% generation %}`), which the labels need.

    Tokenizers saved before the markers existed carry a template that renders exactly like Ember's
    current one; they get the current template. Any other template without the markers is an error.
    """
    template = tokenizer.chat_template
    if isinstance(template, str) and "{% generation %}" in template:
        return tokenizer
    if template is None:
        raise ValueError("tokenizer: has no chat template; instruction data needs one with a {% generation %} block")
    ours = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False, chat_template=CHAT_TEMPLATE)
    theirs = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    if ours != theirs:
        raise ValueError("tokenizer: its chat template has no {% generation %} block around assistant content, "
                         "so response tokens cannot be told apart")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenized conversations with response-only labels, cut to `max_length` tokens.

    `stats` counts examples, truncated ones, ones dropped because truncation left no response token,
    and tokens. Items are `{"input_ids": list[int], "labels": list[int]}`.
    """

    def __init__(self, path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int = 256):
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {max_length}")
        ensure_assistant_mask_template(tokenizer)
        conversations = read_conversations(path, tuple(token for token in tokenizer.all_special_tokens if token))
        if not conversations:
            raise ValueError(f"{path}: no instruction examples")
        self.examples: list[dict[str, list[int]]] = []
        self.stats = {"examples": 0, "truncated": 0, "dropped_no_response": 0, "tokens": 0, "response_tokens": 0}
        for start in range(0, len(conversations), batch_size):
            batch = [messages for _, messages in conversations[start : start + batch_size]]
            encoded = tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
            for input_ids, assistant_mask in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True):
                labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, assistant_mask)]
                if len(input_ids) > max_length:
                    self.stats["truncated"] += 1
                    input_ids, labels = input_ids[:max_length], labels[:max_length]
                # The first token is never a target (nothing precedes it), so count from the second.
                response_tokens = sum(label != IGNORE_INDEX for label in labels[1:])
                if response_tokens == 0:
                    self.stats["dropped_no_response"] += 1
                    continue
                self.examples.append({"input_ids": input_ids, "labels": labels})
                self.stats["tokens"] += len(input_ids)
                self.stats["response_tokens"] += response_tokens
        self.stats["examples"] = len(self.examples)
        if not self.examples:
            raise ValueError(f"{path}: no example keeps a response token within max_length={max_length}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class InstructionCollator:
    """Right-pads a batch: `pad_token_id` in input_ids, 0 in attention_mask, -100 in labels."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(feature["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Models: base (full precision or 4-bit), LoRA, merge
# ---------------------------------------------------------------------------------------------

def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The last name component of every Linear layer (4-bit ones included): what `target_modules` matches."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def lora_config(model: PreTrainedModel, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                target_modules: list[str] | tuple[str, ...] | None = None, target_experts: bool = True) -> LoraConfig:
    """LoRA on explicit module names, checked against `model`; for an MoE model also on the experts' 3D weights.

    The default targets are the attention and MLP projections the model has (a GELU MLP has no
    gate_proj; an MoE layer's experts are parameters, not Linear layers).
    """
    if r < 1:
        raise ValueError(f"lora_r: must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout: must be in [0, 1), got {dropout}")
    available = linear_layer_names(model)
    if target_modules:
        missing = sorted(set(target_modules) - available)
        if missing:
            raise ValueError(f"lora_target_modules: {missing[0]!r} names no Linear layer of this model "
                             f"(it has {sorted(available)})")
    else:
        target_modules = [name for name in LORA_TARGET_MODULES if name in available]
    extra: dict[str, Any] = {}
    if getattr(model.config, "num_local_experts", 0) > 0 and target_experts:
        if "target_parameters" not in LoraConfig.__dataclass_fields__:
            raise ValueError("lora_target_experts: the installed peft has no LoraConfig.target_parameters "
                             "(peft >= 0.17 adapts 3D expert weights); upgrade peft or set it to false")
        extra["target_parameters"] = list(MOE_EXPERT_PARAMETERS)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(target_modules), **extra)


def add_lora(model: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """Freeze `model` and attach LoRA adapters. A 4-bit model first goes through `prepare_model_for_kbit_training`
    (its unquantized weights to fp32); activation checkpointing is the Trainer's `activation_checkpointing`."""
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


class FinetuningTrainer(OptimizerChoiceMixin, ReadableSavesMixin, Trainer):
    """The HF Trainer, with `optimizer_options.optimizer: muon` building Muon + AdamW (training/muon.py)."""

    def __init__(self, *args, optimizer_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_options = optimizer_options


def finetuning_trainer(model: PeftModel, args: TrainingArguments, train_dataset: InstructionDataset,
                       collator: InstructionCollator, tokenizer: PreTrainedTokenizerBase,
                       optimizer_options=None) -> Trainer:
    """The HF Trainer over the adapter model and the instruction data (loss on response tokens only);
    `optimizer_options` (an `OptimizerArguments`) chooses AdamW or Muon."""
    args.label_names = ["labels"]  # PeftModel.forward takes **kwargs, so the Trainer cannot infer them
    trainer = FinetuningTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                                processing_class=tokenizer, optimizer_options=optimizer_options)
    use_log_lines(trainer)
    return trainer


def parameter_counts(model: PeftModel) -> dict[str, Any]:
    """Trainable (adapter) and total parameters; 4-bit weights counted as the values they hold."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total}


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base_model: str | Path | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None,
                  dtype: str | torch.dtype = "auto") -> PreTrainedModel:
    """Fold a saved adapter into a full-precision load of its base and save a plain checkpoint.

    The base defaults to the one recorded in the adapter's config. QLoRA adapters are merged the
    same way: into the unquantized weights, so the merged model is not a 4-bit round trip. With a
    tokenizer that has `<|im_end|>`, generation stops at the end of an assistant turn as well as at EOS.
    """
    base_path = base_model or adapter_base(adapter_dir)
    base = load_model(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if tokenizer is not None and IM_END in tokenizer.get_vocab() and merged.generation_config is not None:
        stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
        merged.generation_config.eos_token_id = list(dict.fromkeys(stop_ids))
    merged.save_pretrained(str(output_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))
        make_portable(output_dir)
    honour_umask(output_dir)  # safetensors writes its files 0600
    return merged


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def response_loss(model: torch.nn.Module, dataset: InstructionDataset, collator: Callable, batch_size: int = 8,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token loss over the response tokens of `dataset` (every token weighs the same), and its
    perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}
