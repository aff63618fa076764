"""Pretrain an Ember model on the packed shards of `python -m data_prep` with the HF Trainer.

    accelerate launch --config_file accelerate_configs/<tier>.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_<recipe>.yaml [--key=value ...]
    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml      # one process

Keys: `ModelArguments`, `DataArguments` and `PretrainingArguments` (training/arguments.py), plus every
`transformers.TrainingArguments` field; `--help` lists them. The output folder is a Hub-ready model:
safetensors, config with `auto_map` and the model code, the tokenizer, a generation config and a model card.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import upload_folder
from transformers import SchedulerType, TrainingArguments, set_seed

from cli import ConfigError, report_error
from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from evaluation.perplexity import perplexity
from modeling import sizing
from training.arguments import (
    PRETRAIN_PATH_KEYS,
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    parse_training_args,
)
from training.callbacks import NonFiniteGuardCallback, ThroughputCallback, device_peak_flops
from training.checkpoints import exit_with_launcher, output_dir_lock, resolve_resume
from training.optim import lr_scheduler_kwargs
from training.pretraining import build_model, streaming_train_dataset, write_reports
from training.trainer import PretrainingTrainer, collate_packed

SCHEMAS = (ModelArguments, DataArguments, PretrainingArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple:
    """(ModelArguments, DataArguments, PretrainingArguments, TrainingArguments) from a YAML and overrides."""
    return parse_training_args(SCHEMAS, argv, config=config, overrides=overrides, path_keys=PRETRAIN_PATH_KEYS,
                               prog="recipes/pretrain.py", description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    exit_with_launcher()
    try:
        model_args, data_args, run_args, args = parse(sys.argv[1:] if argv is None and config is None else argv,
                                                      config=config, overrides=overrides)
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
        set_seed(args.seed)
        model = build_model(model_args, tokenizer, train.seq_len)
        tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                           * train.seq_len)
        if run_args.max_tokens:
            args.max_steps = math.ceil(run_args.max_tokens / tokens_per_step)
        if data_args.streaming and args.max_steps <= 0:
            raise ConfigError("max_steps: a streaming run needs max_steps (or max_tokens); a stream has no length")
        scheduler, args.lr_scheduler_kwargs = lr_scheduler_kwargs(run_args.schedule, run_args.min_lr_ratio,
                                                                  max_steps=args.max_steps)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    args.lr_scheduler_type = SchedulerType(scheduler)
    if args.eval_strategy != "no" and validation is None:
        args.eval_strategy = "no"
    args.remove_unused_columns = False  # shift_labels and position_ids are not forward() argument names

    flops = sizing.flops_per_token(model.config, train.seq_len)
    peak = device_peak_flops(run_args.peak_flops)
    guard = NonFiniteGuardCallback(run_args.max_consecutive_nonfinite)
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                                 data_collator=collate_packed, processing_class=tokenizer, optimizer_options=run_args,
                                 callbacks=[ThroughputCallback(flops, tokens_per_step, peak, args.world_size), guard])
    if trainer.is_world_process_zero():
        blocks = "streamed blocks" if data_args.streaming else f"{len(train):,} blocks"
        # ZeRO-3 builds the model already partitioned: each parameter keeps its full size in ds_numel
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"[pretrain] {parameters:,} parameters | {blocks} of "
              f"{train.seq_len} | {tokens_per_step:,} tokens/step | {args.max_steps} steps | "
              f"{flops / 1e9:.3f} GFLOP/token | world size {args.world_size}")

    run = contextlib.ExitStack()  # held to the end: the final save and reports belong to this run too
    try:
        # One run per output folder: a second one (or the ranks of a killed launch still running) is refused.
        run.enter_context(output_dir_lock(args.output_dir, enabled=args.process_index == 0))
        # "auto": the newest checkpoint whose files are all whole (a kill mid-save leaves a broken one)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        result = trainer.train(resume_from_checkpoint=resume)
    except ConfigError as err:  # a broken checkpoint named for resuming, a full disk, a busy output folder
        run.close()
        return report_error(err)
    with run:
        return _finish(trainer, result, guard, model_args, data_args, run_args, validation, train.seq_len,
                       tokens_per_step, peak)


def _finish(trainer: PretrainingTrainer, result, guard: NonFiniteGuardCallback, model_args: ModelArguments,
            data_args: DataArguments, run_args: PretrainingArguments, validation, seq_len: int, tokens_per_step: int,
            peak: float | None) -> int:
    """After training: final metrics and evaluation, the final model folder, the reports, the Hub upload."""
    args = trainer.args
    if guard.stop_reason:
        return report_error(guard.stop_reason, status=1)

    metrics = dict(result.metrics)
    if validation is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
        if last_eval.get("step") == trainer.state.global_step:  # the schedule just evaluated the final weights
            metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded (fast resume); the final model is one full file set
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)  # weights, config with auto_map + code, tokenizer, generation config
    trainer.save_state()  # trainer_state.json: the log history and step count next to the weights
    if trainer.is_world_process_zero():
        write_reports(trainer, model_args, data_args, run_args, seq_len, tokens_per_step, peak, metrics)
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
