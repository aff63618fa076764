"""Recipe arguments of pretraining and finetuning: dataclasses read by the one parser (`cli.parse_args`).

    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml --learning_rate=1e-3 --max_steps=50

A recipe YAML is flat: the keys of its dataclasses and of `transformers.TrainingArguments` side by side, as
`HfArgumentParser` expects; comments group them. `parse_training_args` adds what is particular to training:
TrainingArguments fields transformers renamed take either spelling (`RENAMED_TRAINING_FIELDS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from cli import parse_args
from training.muon import LR_SCALINGS, OPTIMIZERS

OBJECTIVES = ("clm", "prefix_lm", "mlm", "ul2")  # the pretraining objectives (training/objectives.py)

# TrainingArguments fields that transformers renamed in 5.23, under their new name -> the old name (5.22 and older,
# down to the oldest Ember supports). Recipes and code use the new names; they work on either.
RENAMED_TRAINING_FIELDS = {"activation_checkpointing": "gradient_checkpointing"}


def renamed_for_installed_transformers(known: set[str] | None = None) -> dict[str, str]:
    """new name -> old name for the renamed fields the installed TrainingArguments knows only by the old name."""
    known = known if known is not None else {f.name for f in dataclasses.fields(TrainingArguments)}
    return {new: old for new, old in RENAMED_TRAINING_FIELDS.items() if new not in known and old in known}


def for_installed_transformers(values: Mapping[str, Any]) -> dict[str, Any]:
    """TrainingArguments keyword arguments with each renamed field under the installed transformers' spelling."""
    renamed = renamed_for_installed_transformers()
    return {renamed.get(key, key): value for key, value in values.items()}


def training_setting(args: TrainingArguments, name: str) -> Any:
    """`args.<name>` under the installed transformers' spelling of `name`."""
    return getattr(args, name) if hasattr(args, name) else getattr(args, RENAMED_TRAINING_FIELDS[name])


def parse_training_args(schemas: Sequence[type], argv: Sequence[str] | None = None, *,
                        config: str | Path | Mapping[str, Any] | None = None,
                        overrides: Mapping[str, Any] | None = None, path_keys: Sequence[str] = (),
                        prog: str = "", description: str = "") -> tuple[Any, ...]:
    """`cli.parse_args` for a training recipe: `schemas` end with `TrainingArguments`."""
    return parse_args(schemas, argv, prog=prog, description=description, config=config, overrides=overrides,
                      path_keys=path_keys, renamed=renamed_for_installed_transformers())


# ---------------------------------------------------------------------------------------------------------------
# Pretraining (recipes/pretrain.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    preset: str = field(default="nano", metadata={"help": "EmberConfig preset (nano, 125m, 350m, 1b, 7b, ...)"})
    model_overrides: dict = field(default_factory=dict, metadata={"help": "EmberConfig fields over the preset"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "continue from this checkpoint"})
    attn_implementation: str = "sdpa"
    tp_size: int = field(default=1, metadata={
        "help": "tensor-parallel ranks per model replica (the config's base_model_tp_plan); the other "
                "world_size / tp_size ranks shard the data (FSDP2)"})


@dataclass
class DataArguments:
    data_dir: str = field(default="", metadata={"help": "output_dir of a data_prep run (tokenizer/, tokens/)"})
    position_ids: bool = field(default=True, metadata={"help": "per-document positions: no attention across EOS"})
    streaming: bool = field(default=False, metadata={"help": "tokenize and pack documents on the fly"})
    stream_source: str = field(default="", metadata={
        "help": "streaming: documents folder/file or Hub dataset name; default <data_dir>/documents/train"})
    text_field: str = "text"
    seq_len: int = field(default=0, metadata={"help": "streaming: block length; 0 = the data_prep run's pack.seq_len"})
    max_eval_blocks: int = field(default=0, metadata={
        "help": "evaluate on this many validation blocks, spread evenly over the split; 0 = all"})


@dataclass
class OptimizerArguments:
    """Which optimizer takes the hidden weight matrices (training/muon.py); the rest always get AdamW."""
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (the Trainer's own, `optim` picks its kernel) or muon (Muon on hidden matrices, AdamW on "
                "embeddings, head, norms, biases)"})
    muon_learning_rate: float | None = field(default=None, metadata={
        "help": "Muon's peak learning rate; default learning_rate (right for muon_lr_scaling=match_rms_adamw)"})
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_lr_scaling: str = field(default="match_rms_adamw", metadata={
        "help": "match_rms_adamw: lr x 0.2 sqrt(max(m, n)) (Moonlight); original: lr x sqrt(max(1, m/n))"})
    muon_ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations"})

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.muon_lr_scaling not in LR_SCALINGS:
            raise ValueError(f"muon_lr_scaling: must be one of {', '.join(LR_SCALINGS)}, got {self.muon_lr_scaling!r}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.muon_learning_rate is not None and self.muon_learning_rate <= 0:
            raise ValueError(f"muon_learning_rate: must be > 0, got {self.muon_learning_rate}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"muon_ns_steps: must be >= 1, got {self.muon_ns_steps}")


@dataclass
class PretrainingArguments(OptimizerArguments):
    max_tokens: float | None = field(default=None, metadata={"help": "token budget; sets max_steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to min_lr_ratio) or wsd"})
    min_lr_ratio: float = 0.1
    max_consecutive_nonfinite: int = field(default=5, metadata={
        "help": "stop after this many optimizer steps in a row with NaN/inf gradients (each one is skipped)"})
    peak_flops: float | None = field(default=None, metadata={"help": "per-device peak FLOP/s for MFU"})
    expected_mfu: float = field(default=0.4, metadata={"help": "MFU the run report's time estimate assumes"})
    # stability and better models per unit of compute (training/data_order.py, spikes.py, ema.py)
    z_loss: float = field(default=0.0, metadata={
        "help": "coefficient of the z-loss on the output logits' log-normaliser (PaLM: 1e-4); 0 = off"})
    batch_size_warmup_tokens: float = field(default=0, metadata={
        "help": "grow tokens per step linearly from batch_size_warmup_start_tokens to the full batch over this many "
                "tokens, by gradient accumulation; 0 = off"})
    batch_size_warmup_start_tokens: float = field(default=0, metadata={
        "help": "tokens per step at the start of the warmup; 0 = one micro-batch per rank"})
    ema_decay: float | None = field(default=None, metadata={
        "help": "keep an exponential moving average of the weights with this decay, saved to <output_dir>/ema"})
    loss_spike_zscore: float = field(default=0.0, metadata={
        "help": "a step loss this many standard deviations above the mean of the last loss_spike_window steps "
                "rolls back to the last checkpoint, scores the blocks since from its weights and skips the ones "
                "that stand out (a shift the fresh data shares re-baselines instead); 0 = off"})
    loss_spike_window: int = field(default=50, metadata={"help": "steps whose losses the spike test compares with"})
    loss_spike_skip_ahead: int = field(default=0, metadata={
        "help": "steps after the spike whose blocks a rollback scores too; 0 = as many as lie between the "
                "checkpoint and the spike"})
    max_rollbacks: int = field(default=3, metadata={"help": "stop with an error after this many loss-spike rollbacks"})
    # downstream tasks during training (training/downstream.py)
    downstream_tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-eval tasks run on rank 0 every downstream_steps steps and at the last (the eval extra)"})
    downstream_include_path: list[str] = field(default_factory=list, metadata={
        "help": "folders of local lm-eval task YAMLs, e.g. tests/data/lm_eval_tasks"})
    downstream_steps: int = field(default=0, metadata={"help": "how often the downstream tasks run, in steps"})
    downstream_limit: float | None = field(default=None, metadata={
        "help": "examples per downstream task (a fraction of each when < 1); all when unset"})

    def __post_init__(self):
        super().__post_init__()
        if self.downstream_tasks and self.downstream_steps < 1:
            raise ValueError(f"downstream_steps: set how often downstream_tasks run (>= 1), got "
                             f"{self.downstream_steps}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss: must be >= 0, got {self.z_loss}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        for name in ("batch_size_warmup_tokens", "batch_size_warmup_start_tokens", "loss_spike_zscore"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.loss_spike_window < 2:
            raise ValueError(f"loss_spike_window: must be >= 2 steps, got {self.loss_spike_window}")
        if self.loss_spike_skip_ahead < 0:
            raise ValueError(f"loss_spike_skip_ahead: must be >= 0, got {self.loss_spike_skip_ahead}")
        if self.max_rollbacks < 0:
            raise ValueError(f"max_rollbacks: must be >= 0, got {self.max_rollbacks}")


@dataclass
class ObjectiveArguments:
    """What the model reads and which tokens the loss scores (training/objectives.py)."""
    objective: str = field(default="clm", metadata={
        "help": "clm | prefix_lm | mlm | ul2 (mlm trains a bidirectional encoder, EmberForMaskedLM)"})
    mask_rate: float = field(default=0.15, metadata={"help": "mlm: fraction of tokens selected for prediction"})
    mask_token_rate: float = field(default=0.8, metadata={"help": "mlm: of the selected, replaced by <|mask|>"})
    random_token_rate: float = field(default=0.1, metadata={
        "help": "mlm: of the selected, replaced by a random token (the rest stay unchanged)"})
    whole_word_mask: bool = field(default=False, metadata={"help": "mlm: select whole words, not single tokens"})
    prefix_min_fraction: float = field(default=0.25, metadata={
        "help": "prefix_lm: shortest prefix, as a fraction of each document"})
    prefix_max_fraction: float = field(default=0.75, metadata={"help": "prefix_lm: longest prefix fraction"})
    prefix_tokens: int = field(default=0, metadata={
        "help": "prefix_lm: a fixed prefix of this many tokens per document instead of a fraction (0: off)"})

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("mask_rate", "mask_token_rate", "random_token_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.mask_rate == 0.0:
            raise ValueError("mask_rate: must be > 0 (nothing would be scored)")
        if self.mask_token_rate + self.random_token_rate > 1.0:
            raise ValueError(f"random_token_rate: mask_token_rate + random_token_rate must be <= 1, got "
                             f"{self.mask_token_rate} + {self.random_token_rate}")
        if not 0.0 < self.prefix_min_fraction <= self.prefix_max_fraction < 1.0:
            raise ValueError(f"prefix_min_fraction: need 0 < prefix_min_fraction <= prefix_max_fraction < 1, got "
                             f"{self.prefix_min_fraction} and {self.prefix_max_fraction}")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens: must be >= 0, got {self.prefix_tokens}")

    def check(self, seq_len: int) -> None:
        """One-line `ValueError` naming the field for settings no block of `seq_len` tokens can serve."""
        if self.prefix_tokens >= seq_len:
            raise ValueError(f"prefix_tokens: {self.prefix_tokens} is not shorter than the blocks ({seq_len} tokens); "
                             "no token would be left to score")


PRETRAIN_PATH_KEYS = ("data_dir", "output_dir", "downstream_include_path.*")


# ---------------------------------------------------------------------------------------------------------------
# LoRA / QLoRA finetuning (recipes/finetune_lora.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BaseModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "checkpoint folder with weights and tokenizer"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: base in 4-bit NF4 (bitsandbytes)"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the unquantized base: auto (as saved), "
                                                          "float32, bfloat16"})
    attn_implementation: str = "sdpa"


@dataclass
class LoraArguments(OptimizerArguments):
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Linear layer names; default q/k/v/o_proj and gate/up/down_proj"})
    lora_target_experts: bool = field(default=True, metadata={"help": "MoE: adapt the experts' 3D weights too"})
    merge: bool = field(default=True, metadata={"help": "also save the merged model to output_dir/merged"})


@dataclass
class InstructionDataArguments:
    train_file: str = field(default="", metadata={"help": "jsonl of {prompt, response} or {messages} records"})
    validation_file: str | None = field(default=None, metadata={"help": "for the before/after response loss"})
    max_length: int = field(default=512, metadata={"help": "tokens per example; longer ones are cut"})


FINETUNE_PATH_KEYS = ("model_name_or_path", "train_file", "validation_file", "output_dir", "logging_dir")


# ---------------------------------------------------------------------------------------------------------------
# Classifier finetuning (recipes/finetune_classifier.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Ember checkpoint folder (its tokenizer too)"})
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer folder; default: model_name_or_path"})
    from_scratch: bool = field(default=False, metadata={"help": "random trunk of the checkpoint's shape (baseline)"})
    task: str = field(default="sequence", metadata={"help": "sequence ({text, label} records) | token ({tokens, "
                                                            "tags} records, BIO tags)"})
    train_file: str = field(default="", metadata={"help": "jsonl of labelled records"})
    validation_file: str = field(default="", metadata={"help": "jsonl of labelled records, scored after training"})
    labels: list[str] | None = field(default=None, metadata={"help": "the label set; default: the train file's"})
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are cut"})
    classifier_pooling: str = field(default="", metadata={
        "help": "task sequence: last (token) or mean (over the text); empty: the checkpoint's own setting, else "
                "last for a decoder, mean for an encoder"})
    lora: bool = field(default=False, metadata={"help": "LoRA on the trunk's projections; the head trains fully"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if self.task not in ("sequence", "token"):
            raise ValueError(f"task: expected sequence or token, got {self.task!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {self.max_length}")
        if self.classifier_pooling not in ("", "last", "mean"):
            raise ValueError(f"classifier_pooling: expected last or mean, got {self.classifier_pooling!r}")


CLASSIFIER_PATH_KEYS = ("model_name_or_path", "tokenizer_path", "train_file", "validation_file", "output_dir",
                        "logging_dir")
