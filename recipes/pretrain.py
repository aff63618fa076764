"""Pretrain an Ember model on the packed shards of `python -m data_prep` with the HF Trainer.

    accelerate launch --config_file accelerate_configs/<tier>.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_<recipe>.yaml [--key=value ...]
    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml      # one process

Keys: `ModelArguments` and `DataArguments` below, plus every `transformers.TrainingArguments` field.
The output folder is a Hub-ready model: safetensors, config with `auto_map` and the model code, the
tokenizer, a generation config and a model card.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from huggingface_hub import upload_folder
from transformers import GenerationConfig, SchedulerType, TrainingArguments, set_seed

from data_prep.config import PackConfig, load_config
from data_prep.token_dataset import PackedDataset, StreamingPackedDataset, open_document_stream
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from modeling import EmberConfig, EmberForCausalLM, sizing
from modeling.recipe_config import RecipeConfigError, parse_recipe_args, training_setting
from modeling.run_report import write_model_card, write_run_report
from modeling.training import (
    NonFiniteGuardCallback,
    PretrainingTrainer,
    ThroughputCallback,
    collate_packed,
    device_peak_flops,
    latest_complete_checkpoint,
    lr_scheduler_kwargs,
)


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
    max_tokens: float | None = field(default=None, metadata={"help": "token budget; sets max_steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to min_lr_ratio) or wsd"})
    min_lr_ratio: float = 0.1
    max_consecutive_nonfinite: int = 5
    peak_flops: float | None = field(default=None, metadata={"help": "per-device peak FLOP/s for MFU"})
    expected_mfu: float = field(default=0.4, metadata={"help": "MFU the run report's time estimate assumes"})


PATH_KEYS = ("data_dir", "output_dir")
REPORTED_TRAINING_KEYS = ("learning_rate", "warmup_steps", "weight_decay", "max_steps", "max_grad_norm",
                          "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "seed")


def build_model(model_args: ModelArguments, tokenizer, seq_len: int) -> EmberForCausalLM:
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if model_args.model_name_or_path:
        model = EmberForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                 attn_implementation=model_args.attn_implementation)
        if model.config.vocab_size != len(tokenizer):
            raise RecipeConfigError(f"model_name_or_path: vocab_size {model.config.vocab_size} does not match the "
                                    f"tokenizer's {len(tokenizer)} tokens")
    else:
        overrides = {**special, **model_args.model_overrides}
        overrides.setdefault("max_position_embeddings", seq_len)
        config = EmberConfig.from_preset(model_args.preset, **overrides)
        if config.vocab_size != len(tokenizer):
            raise RecipeConfigError(f"model_overrides.vocab_size: {config.vocab_size} does not match the "
                                    f"tokenizer's {len(tokenizer)} tokens")
        model = EmberForCausalLM._from_config(config, attn_implementation=model_args.attn_implementation)
    if model.config.max_position_embeddings < seq_len:
        raise RecipeConfigError(f"max_position_embeddings: {model.config.max_position_embeddings} is shorter than "
                                f"the shards' seq_len {seq_len}")
    if model_args.tp_size > 1:
        model = tensor_parallel(model, model_args)
    model.config.use_cache = False  # packed rows: boundary masking from position_ids needs no cache
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=256)
    return model


def tensor_parallel(model: EmberForCausalLM, model_args: ModelArguments) -> EmberForCausalLM:
    """The model reloaded through transformers' `DistributedConfig`: its `base_model_tp_plan` over `tp_size` ranks,
    FSDP2 over the world_size / tp_size data-parallel ranks. The Trainer then hands accelerate the matching
    `ParallelismConfig(tp_size, dp_shard_size)`. Every rank built the same seeded weights, so each reloads its
    own copy (no shared filesystem needed)."""
    import tempfile

    from safetensors.torch import save_model
    from transformers.distributed.configuration_utils import DistributedConfig

    tp, world = model_args.tp_size, int(os.environ.get("WORLD_SIZE", "1"))
    config = model.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, key) % tp:
            raise RecipeConfigError(f"tp_size: {tp} does not divide {key} ({getattr(config, key)})")
    if world % tp:
        raise RecipeConfigError(f"tp_size: {tp} does not divide the {world} ranks of this launch")
    distributed = DistributedConfig(tp_size=tp, fsdp_size=world // tp)
    with tempfile.TemporaryDirectory(prefix="ember-tp-") as tmp:
        # Written by every rank into its own folder (save_pretrained writes on rank 0 only).
        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        return EmberForCausalLM.from_pretrained(tmp, distributed_config=distributed,
                                                attn_implementation=model_args.attn_implementation)


def streaming_train_dataset(data_args: DataArguments, tokenizer, args: TrainingArguments) -> StreamingPackedDataset:
    """This rank's share of the documents, packed on the fly like the data_prep run packed its shards."""
    data_dir = Path(data_args.data_dir)
    pack = load_config(data_dir / "pipeline_config.yaml").pack if (data_dir / "pipeline_config.yaml").is_file() \
        else PackConfig()
    if data_args.seq_len:
        pack.seq_len = data_args.seq_len
    documents = open_document_stream(data_args.stream_source or data_dir / "documents" / "train",
                                     text_field=data_args.text_field, rank=args.process_index,
                                     world_size=args.world_size)
    return StreamingPackedDataset(documents, tokenizer, pack, return_position_ids=data_args.position_ids)


def write_reports(trainer: PretrainingTrainer, model_args: ModelArguments, data_args: DataArguments, seq_len: int,
                  tokens_per_step: int, peak: float | None, metrics: dict) -> None:
    """run_report/ (plots + report.md, sizing estimate vs measured) and the model card README.md."""
    args, config, output_dir = trainer.args, trainer.model.config, Path(trainer.args.output_dir)
    strategy = "zero3" if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled else "ddp"
    checkpointing = training_setting(args, "activation_checkpointing")
    memory = sizing.memory_per_gpu(config, args.world_size, strategy, args.per_device_train_batch_size, seq_len,
                                   checkpointing, param_bytes=2 if args.bf16 else 4,
                                   flash_attention=model_args.attn_implementation != "eager")
    planned = tokens_per_step * args.max_steps
    recipe = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args),
              **{key: getattr(args, key) for key in REPORTED_TRAINING_KEYS}}
    write_run_report(output_dir, trainer.state.log_history, {
        "config": recipe, "tokens_per_step": tokens_per_step, "estimated_memory_gb": memory["total"] / 2**30,
        "estimated_seconds": (sizing.training_time(config, planned, args.world_size, peak, data_args.expected_mfu,
                                                   seq_len) if peak else None)})
    steps = trainer.state.global_step
    write_model_card(output_dir, model_name=output_dir.name, config=config, datasets=[Path(data_args.data_dir).name],
                     metrics=metrics, repo_id=args.hub_model_id, training={
                         "tokens": tokens_per_step * steps, "steps": steps, "tokens_per_step": tokens_per_step,
                         "seq_len": seq_len, "global_batch_size": tokens_per_step // seq_len,
                         "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                         "lr_schedule": f"{data_args.schedule}, {args.warmup_steps} warmup steps, "
                                        f"min {data_args.min_lr_ratio} x peak",
                         "precision": "bf16" if args.bf16 else "fp32", "world_size": args.world_size,
                         "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                         "wall_seconds": metrics.get("train_runtime")})


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, args = parse_recipe_args((ModelArguments, DataArguments, TrainingArguments),
                                                        sys.argv[1:] if argv is None else argv, PATH_KEYS)
        data_dir = Path(data_args.data_dir)
        tokenizer = load_tokenizer(data_dir / "tokenizer")
        fingerprint = tokenizer_fingerprint(tokenizer)
        if data_args.streaming:
            train = streaming_train_dataset(data_args, tokenizer, args)
        else:
            train = PackedDataset(data_dir / "tokens" / "train", return_position_ids=data_args.position_ids,
                                  expected_fingerprint=fingerprint)
        validation_dir = data_dir / "tokens" / "validation"
        validation = (PackedDataset(validation_dir, return_position_ids=data_args.position_ids,
                                    expected_fingerprint=fingerprint) if validation_dir.is_dir() else None)
        if validation is not None and len(validation) == 0:
            validation = None
        if model_args.tp_size > 1 and args.save_strategy != "no" and not args.save_only_model:
            raise RecipeConfigError("tp_size: the Trainer cannot checkpoint the optimizer state of a model sharded at "
                                    "load time; pass --save_only_model=true (weights only, no resume) or "
                                    "--save_strategy=no")
        set_seed(args.seed)
        model = build_model(model_args, tokenizer, train.seq_len)
    except (RecipeConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # Ranks of one tensor-parallel group read the same rows: the data-parallel degree is world_size / tp_size.
    tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                       * (args.world_size // model_args.tp_size) * train.seq_len)
    if data_args.max_tokens:
        args.max_steps = math.ceil(data_args.max_tokens / tokens_per_step)
    if data_args.streaming and args.max_steps <= 0:
        print("error: max_steps: a streaming run needs max_steps (or max_tokens); a stream has no length",
              file=sys.stderr)
        return 2
    scheduler, args.lr_scheduler_kwargs = lr_scheduler_kwargs(data_args.schedule, data_args.min_lr_ratio,
                                                              max_steps=args.max_steps)
    args.lr_scheduler_type = SchedulerType(scheduler)
    if args.eval_strategy != "no" and validation is None:
        args.eval_strategy = "no"
    args.remove_unused_columns = False  # shift_labels and position_ids are not forward() argument names

    flops = sizing.flops_per_token(model.config, train.seq_len)
    peak = device_peak_flops(data_args.peak_flops)
    guard = NonFiniteGuardCallback(data_args.max_consecutive_nonfinite)
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                                 data_collator=collate_packed, processing_class=tokenizer,
                                 callbacks=[ThroughputCallback(flops, tokens_per_step, peak, args.world_size), guard])
    if trainer.is_world_process_zero():
        blocks = "streamed blocks" if data_args.streaming else f"{len(train):,} blocks"
        # ZeRO-3 builds the model already partitioned: each parameter keeps its full size in ds_numel
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"[pretrain] {parameters:,} parameters | {blocks} of "
              f"{train.seq_len} | {tokens_per_step:,} tokens/step | {args.max_steps} steps | "
              f"{flops / 1e9:.3f} GFLOP/token | world size {args.world_size}")
        if model_args.tp_size > 1:
            from torch.distributed.tensor import DTensor

            sharded = [n for n, p in model.named_parameters()
                       if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)]
            print(f"[pretrain] tensor parallel {model_args.tp_size} x data parallel "
                  f"{args.world_size // model_args.tp_size}: {len(sharded)} parameters sharded")

    resume = args.resume_from_checkpoint
    if resume == "auto":
        resume = latest_complete_checkpoint(args.output_dir)  # a kill mid-save leaves an incomplete one
    result = trainer.train(resume_from_checkpoint=resume)
    if guard.stop_reason:
        if trainer.is_world_process_zero():
            print(f"error: {guard.stop_reason}", file=sys.stderr)
        return 1

    metrics = dict(result.metrics)
    if validation is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
        if last_eval.get("step") == trainer.state.global_step:  # the schedule just evaluated the final weights
            metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded (fast resume); the final model is one full file set
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)  # weights, config with auto_map + code, tokenizer, generation config
    trainer.save_state()  # trainer_state.json: the log history and step count next to the weights
    if trainer.is_world_process_zero():
        write_reports(trainer, model_args, data_args, train.seq_len, tokens_per_step, peak, metrics)
    if args.push_to_hub:  # Trainer.push_to_hub would replace README.md with its generic card
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            upload_folder(repo_id=trainer.hub_model_id, folder_path=args.output_dir,
                          commit_message="Ember pretraining: final model", ignore_patterns=["checkpoint-*"])
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    transformers.logging.set_verbosity_warning()
    sys.exit(main())
