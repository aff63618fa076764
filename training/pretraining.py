"""The pieces of a pretraining run that `recipes/pretrain.py` wires together: the model, the streamed training
data, and the reports written at the end."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, TrainingArguments

from cli import ConfigError
from data_prep.documents import open_document_stream
from data_prep.pipeline import packing_settings
from data_prep.token_dataset import StreamingPackedDataset
from modeling import EmberConfig, EmberForCausalLM, EmberForMaskedLM, sizing
from modeling.loading import load_model
from training.arguments import (
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    PretrainingArguments,
    training_setting,
)
from training.model_card import write_model_card
from training.run_report import REPORT_DIR, write_run_report
from training.trainer import PretrainingTrainer

SETTINGS_FILE = "settings.json"  # in run_report/: the settings the report lists, for other reports to read
# TrainingArguments shown in the run report next to the recipe's own keys.
REPORTED_TRAINING_KEYS = ("learning_rate", "warmup_steps", "weight_decay", "max_steps", "max_grad_norm",
                          "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "seed")


def build_model(model_args: ModelArguments, tokenizer, seq_len: int, objective: str = "clm") -> PreTrainedModel:
    """A fresh model from a preset (and overrides), or the checkpoint to continue from, checked against the data.
    `objective: mlm` makes it a bidirectional encoder with a masked-LM head (`EmberForMaskedLM`)."""
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    masked = objective == "mlm"
    model_class = EmberForMaskedLM if masked else EmberForCausalLM
    if model_args.model_name_or_path:
        model = load_model(model_args.model_name_or_path, attn_implementation=model_args.attn_implementation,
                           head="masked_lm" if masked else "causal_lm")
        if not isinstance(model, model_class):
            raise ConfigError(f"model_name_or_path: {type(model).__name__} is not an Ember model (convert it with "
                              "python -m modeling.convert from-hf)")
        if model.config.vocab_size != len(tokenizer):
            raise ConfigError(f"model_name_or_path: vocab_size {model.config.vocab_size} does not match the "
                              f"tokenizer's {len(tokenizer)} tokens")
    else:
        overrides = {**special, **model_args.model_overrides}
        overrides.setdefault("max_position_embeddings", seq_len)
        if masked:
            if overrides.get("is_causal", False):
                raise ConfigError("model_overrides.is_causal: objective 'mlm' trains a bidirectional encoder; "
                                  "leave is_causal unset or false")
            overrides["is_causal"] = False
        config = EmberConfig.from_preset(model_args.preset, **overrides)
        if config.vocab_size != len(tokenizer):
            raise ConfigError(f"model_overrides.vocab_size: {config.vocab_size} does not match the "
                              f"tokenizer's {len(tokenizer)} tokens")
        if not masked and not config.is_causal:
            raise ConfigError(f"model_overrides.is_causal: objective '{objective}' trains a decoder; an encoder "
                              "(is_causal: false) takes objective: mlm")
        model = model_class._from_config(config, attn_implementation=model_args.attn_implementation)
    if model.config.max_position_embeddings < seq_len:
        raise ConfigError(f"max_position_embeddings: {model.config.max_position_embeddings} is shorter than "
                          f"the shards' seq_len {seq_len}")
    if model_args.tp_size > 1:
        model = tensor_parallel(model, model_args)
    model.config.use_cache = False  # packed rows: boundary masking from position_ids needs no cache
    if not masked:  # an encoder does not generate
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id, max_new_tokens=256)
    return model


def tensor_parallel(model: PreTrainedModel, model_args: ModelArguments) -> PreTrainedModel:
    """The model reloaded through transformers' `DistributedConfig`: its `base_model_tp_plan` over `tp_size` ranks,
    FSDP2 over the world_size / tp_size data-parallel ranks. The Trainer then hands accelerate the matching
    `ParallelismConfig(tp_size, dp_shard_size)`. Every rank built the same seeded weights, so each reloads its
    own copy (no shared filesystem needed)."""
    from safetensors.torch import save_model
    from transformers.distributed.configuration_utils import DistributedConfig

    tp, world = model_args.tp_size, int(os.environ.get("WORLD_SIZE", "1"))
    config = model.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, key) % tp:
            raise ConfigError(f"tp_size: {tp} does not divide {key} ({getattr(config, key)})")
    if world % tp:
        raise ConfigError(f"tp_size: {tp} does not divide the {world} ranks of this launch")
    distributed = DistributedConfig(tp_size=tp, fsdp_size=world // tp)
    with tempfile.TemporaryDirectory(prefix="ember-tp-") as tmp:
        # Written by every rank into its own folder (save_pretrained writes on rank 0 only).
        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        return type(model).from_pretrained(tmp, distributed_config=distributed,
                                           attn_implementation=model_args.attn_implementation)


def streaming_train_dataset(data_args: DataArguments, tokenizer, args: TrainingArguments) -> StreamingPackedDataset:
    """This rank's share of the documents, packed on the fly the way the data_prep run packed its shards."""
    pack = packing_settings(data_args.data_dir)
    if data_args.seq_len:
        pack.seq_len = data_args.seq_len
    documents = open_document_stream(data_args.stream_source or Path(data_args.data_dir) / "documents" / "train",
                                     text_field=data_args.text_field, rank=args.process_index,
                                     world_size=args.world_size)
    return StreamingPackedDataset(documents, tokenizer, pack, return_position_ids=data_args.position_ids)


def write_reports(trainer: PretrainingTrainer, model_args: ModelArguments, data_args: DataArguments,
                  run_args: PretrainingArguments, seq_len: int, tokens_per_step: int, total_tokens: int,
                  peak: float | None, metrics: dict, objective_args: ObjectiveArguments | None = None) -> None:
    """run_report/ (plots + report.md, sizing estimate vs measured) and the model card README.md.

    tokens_per_step: of a full step; total_tokens: of the whole run (less than steps x tokens_per_step while
    the batch grows)."""
    args, config, output_dir = trainer.args, trainer.model.config, Path(trainer.args.output_dir)
    strategy = "zero3" if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled else "ddp"
    checkpointing = training_setting(args, "activation_checkpointing")
    # position_ids mask packed documents apart (a mask for sdpa and eager); gradients outlive a step under
    # DDP/FSDP/ZeRO and accumulation, while one process without accumulation frees them every step.
    memory = sizing.memory_per_gpu(config, args.world_size, strategy, args.per_device_train_batch_size, seq_len,
                                   checkpointing, param_bytes=2 if args.bf16 else 4,
                                   flash_attention=model_args.attn_implementation != "eager",
                                   attention_mask=data_args.position_ids
                                   and model_args.attn_implementation in ("sdpa", "eager"),
                                   gradients_persist=args.world_size > 1 or args.gradient_accumulation_steps > 1)
    planned = total_tokens
    recipe = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(run_args),
              **(dataclasses.asdict(objective_args) if objective_args is not None else {}),
              **{key: getattr(args, key) for key in REPORTED_TRAINING_KEYS}}
    (output_dir / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_DIR / SETTINGS_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    write_run_report(output_dir, trainer.state.log_history, {
        "config": recipe, "tokens_per_step": tokens_per_step, "rollbacks": trainer.data_state.rollbacks,
        "objective": objective_args.objective if objective_args is not None else "clm",
        **({"tokens_seen": total_tokens} if trainer.step_micro_batches and trainer.state.global_step == args.max_steps
           else {}),
        "estimated_memory_gb": memory["total"] / 2**30, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "estimated_seconds": (sizing.training_time(config, planned, args.world_size, peak, run_args.expected_mfu,
                                                   seq_len) if peak else None)})
    steps = trainer.state.global_step
    write_model_card(output_dir, model_name=output_dir.name, config=config, datasets=[Path(data_args.data_dir).name],
                     metrics=metrics, repo_id=args.hub_model_id,
                     objective=objective_args.objective if objective_args is not None else "clm", training={
                         "tokens": total_tokens if steps == args.max_steps else tokens_per_step * steps,
                         "steps": steps, "tokens_per_step": tokens_per_step,
                         "seq_len": seq_len, "global_batch_size": tokens_per_step // seq_len,
                         "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                         "lr_schedule": f"{run_args.schedule}, {args.warmup_steps} warmup steps, "
                                        f"min {run_args.min_lr_ratio} x peak",
                         "precision": "bf16" if args.bf16 else "fp32", "world_size": args.world_size,
                         "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                         "wall_seconds": metrics.get("train_runtime")})
