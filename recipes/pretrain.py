"""Pretrain an Ember model on the packed shards of `python -m data_prep` with the HF Trainer.

    accelerate launch --config_file accelerate_configs/<tier>.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_<recipe>.yaml [--key=value ...]
    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml      # one process

Keys: `ModelArguments`, `DataArguments`, `PretrainingArguments` and `ObjectiveArguments` (training/arguments.py;
`objective: clm | prefix_lm | mlm | ul2`, where mlm trains a bidirectional encoder, `EmberForMaskedLM`), plus every
`transformers.TrainingArguments` field; `--help` lists them. The output folder is a Hub-ready model:
safetensors, config with `auto_map` and the model code, the tokenizer, a generation config and a model card.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import SchedulerType, TrainingArguments, set_seed

from cli import ConfigError, report_error
from data_prep.pipeline import split_bytes_per_token
from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from evaluation.perplexity import perplexity
from modeling import sizing
from training.arguments import (
    PRETRAIN_PATH_KEYS,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    PretrainingArguments,
    parse_training_args,
)
from training.averaging import EMACallback
from training.callbacks import NonFiniteGuardCallback, ThroughputCallback, device_peak_flops
from training.checkpoints import as_launched_rank, exit_rank, resolve_resume, saved_step
from training.data_order import BatchRamp
from training.downstream import DownstreamEvalCallback
from training.hub import push
from training.interrupt import StopOnInterrupt, locked_run, stop_quietly
from training.objectives import build_collator
from training.optim import lr_scheduler_kwargs
from training.pretraining import build_model, streaming_train_dataset, write_reports
from training.spikes import DataState, LossSpikeCallback, train_with_rollbacks
from training.trainer import PretrainingTrainer

SCHEMAS = (ModelArguments, DataArguments, PretrainingArguments, ObjectiveArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple:
    """(ModelArguments, DataArguments, PretrainingArguments, ObjectiveArguments, TrainingArguments) from a YAML and
    overrides."""
    return parse_training_args(SCHEMAS, argv, config=config, overrides=overrides, path_keys=PRETRAIN_PATH_KEYS,
                               prog="recipes/pretrain.py", description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    as_launched_rank()
    try:
        model_args, data_args, run_args, objective_args, args = parse(
            sys.argv[1:] if argv is None and config is None else argv, config=config, overrides=overrides)
        data_dir = Path(data_args.data_dir)
        if not (data_dir / "tokenizer").is_dir():
            raise ConfigError(f"data_dir: {data_dir} holds no data_prep run (no tokenizer/); make one with `make data` "
                              "(python -m data_prep run --config recipes/configs/data/stdlib.yaml), or point "
                              "--data_dir at one, e.g. the quickstart's outputs/quickstart/data")
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
        if validation is not None and 0 < data_args.max_eval_blocks < len(validation):
            spread = torch.linspace(0, len(validation) - 1, data_args.max_eval_blocks).round().long().tolist()
            validation = torch.utils.data.Subset(validation, spread)
        if model_args.tp_size > 1 and args.save_strategy != "no" and not args.save_only_model:
            raise ConfigError("tp_size: the Trainer cannot checkpoint the optimizer state of a model sharded at load "
                              "time; pass --save_only_model=true (weights only, no resume) or --save_strategy=no")
        collator = build_collator(objective_args, tokenizer, train.seq_len)
        set_seed(args.seed)
        model = build_model(model_args, tokenizer, train.seq_len, objective_args.objective)
        tokenizer.model_max_length = model.config.max_position_embeddings  # saved with the model: its context
        # Ranks of one tensor-parallel group read the same rows: the data-parallel degree is world_size / tp_size.
        data_parallel = args.world_size // model_args.tp_size
        tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel
                           * train.seq_len)
        step_micro_batches = None
        if run_args.batch_size_warmup_tokens:
            step_micro_batches = batch_ramp_schedule(run_args, args, data_parallel, train.seq_len)
        elif run_args.max_tokens:
            args.max_steps = math.ceil(run_args.max_tokens / tokens_per_step)
        if data_args.streaming and args.max_steps <= 0:
            raise ConfigError("max_steps: a streaming run needs max_steps (or max_tokens); a stream has no length")
        if run_args.loss_spike_zscore and args.save_strategy == "no":
            raise ConfigError("loss_spike_zscore: a rollback needs checkpoints to go back to; set save_strategy "
                              "and save_steps")
        scheduler, args.lr_scheduler_kwargs = lr_scheduler_kwargs(run_args.schedule, run_args.min_lr_ratio,
                                                                  max_steps=args.max_steps)
        if run_args.downstream_tasks and model_args.tp_size > 1:
            raise ConfigError("downstream_tasks: rank 0 evaluates its own copy of the model, which tensor parallel "
                              "shards; run them on a checkpoint (evaluation/downstream.py) instead")
        downstream = (DownstreamEvalCallback(run_args.downstream_tasks, run_args.downstream_include_path,
                                             run_args.downstream_steps, run_args.downstream_limit)
                      if run_args.downstream_tasks else None)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return report_error(err)
    args.lr_scheduler_type = SchedulerType(scheduler)
    if args.eval_strategy != "no" and validation is None:
        args.eval_strategy = "no"
    args.remove_unused_columns = False  # shift_labels and position_ids are not forward() argument names
    if args.ddp_find_unused_parameters is None:  # only MoE layers can leave parameters (experts) without gradient
        args.ddp_find_unused_parameters = bool(model.config.is_moe)

    flops = sizing.flops_per_token(model.config, train.seq_len)
    peak = device_peak_flops(run_args.peak_flops)
    micro_tokens = tokens_per_step // args.gradient_accumulation_steps
    step_tokens = (lambda step: tokens_per_step) if step_micro_batches is None else (
        lambda step: micro_tokens * step_micro_batches[min(step, len(step_micro_batches)) - 1])
    total_tokens = tokens_per_step * args.max_steps if step_micro_batches is None else (
        micro_tokens * sum(step_micro_batches))

    # bits per byte of the validation text: only where the loss scores every token of it
    eval_bytes_per_token = (split_bytes_per_token(data_args.data_dir, "validation")
                            if objective_args.objective == "clm" else None)

    interrupt = StopOnInterrupt()  # Ctrl-C: finish the step, save it, stop

    def make_trainer(data_state: DataState) -> PretrainingTrainer:
        nonlocal model
        if model is None:  # a rollback: a fresh model (the checkpoint's weights load into it), nothing of the old one
            set_seed(args.seed)
            model = build_model(model_args, tokenizer, train.seq_len, objective_args.objective)
        built, model = model, None
        return PretrainingTrainer(
            model=built, args=args, train_dataset=train, eval_dataset=validation, data_collator=collator,
            processing_class=tokenizer, optimizer_options=run_args, z_loss=run_args.z_loss,
            step_micro_batches=step_micro_batches, data_state=data_state,
            loss_spikes=(LossSpikeCallback(run_args.loss_spike_zscore, run_args.loss_spike_window,
                                           run_args.loss_spike_skip_ahead)
                         if run_args.loss_spike_zscore else None),
            eval_bytes_per_token=eval_bytes_per_token,
            ema=EMACallback(run_args.ema_decay) if run_args.ema_decay else None, downstream=downstream,
            callbacks=[ThroughputCallback(flops, step_tokens, peak, args.world_size),
                       NonFiniteGuardCallback(run_args.max_consecutive_nonfinite), interrupt])

    if args.process_index == 0:
        blocks = "streamed blocks" if data_args.streaming else f"{len(train):,} blocks"
        # ZeRO-3 builds the model already partitioned: each parameter keeps its full size in ds_numel
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        batch = f"{tokens_per_step:,} tokens/step" if step_micro_batches is None else (
            f"{step_tokens(1):,} -> {tokens_per_step:,} tokens/step over {run_args.batch_size_warmup_tokens:,.0f} "
            f"tokens ({total_tokens:,} tokens)")
        print(f"[pretrain] {parameters:,} parameters | {blocks} of "
              f"{train.seq_len} | {batch} | {args.max_steps} steps | "
              f"{flops / 1e9:.3f} GFLOP/token | world size {args.world_size}")
        if model_args.tp_size > 1:
            from torch.distributed.tensor import DTensor

            sharded = [n for n, p in model.named_parameters()
                       if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)]
            print(f"[pretrain] tensor parallel {model_args.tp_size} x data parallel "
                  f"{args.world_size // model_args.tp_size}: {len(sharded)} parameters sharded")

    def run_training():
        # "auto": the newest checkpoint whose files are all whole (a kill mid-save leaves a broken one)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        if args.process_index == 0 and args.resume_from_checkpoint == "auto" and resume is None:
            print(f"[pretrain] no checkpoint in {args.output_dir} to resume from: starting at step 0", flush=True)
        if args.process_index == 0 and resume:
            print(f"[pretrain] resuming from {resume} (step {saved_step(Path(resume))})", flush=True)
        # A loss spike rolls back to the last good checkpoint and skips the data since (training/spikes.py).
        return train_with_rollbacks(make_trainer, resume, run_args.max_rollbacks)

    # One run per output folder (a second one, or the ranks of a killed launch still running, is refused).
    return locked_run(args.output_dir, main_process=args.process_index == 0,
                      resumes_itself=args.resume_from_checkpoint == "auto", train=run_training,
                      finish=lambda trained: _finish(*trained, model_args, data_args, run_args, objective_args,
                                                     validation, train.seq_len, tokens_per_step, total_tokens, peak))


def batch_ramp_schedule(run_args: PretrainingArguments, args: TrainingArguments, data_parallel: int,
                        seq_len: int) -> list[int]:
    """Micro-batches of each step under `batch_size_warmup_tokens`; sets `args.max_steps` to their number."""
    micro_tokens = args.per_device_train_batch_size * data_parallel * seq_len
    ramp = BatchRamp(micro_tokens, args.gradient_accumulation_steps,
                     int(run_args.batch_size_warmup_start_tokens), int(run_args.batch_size_warmup_tokens))
    if args.gradient_accumulation_steps < 2:
        raise ConfigError("batch_size_warmup_tokens: the batch grows by gradient accumulation; set "
                          "gradient_accumulation_steps to the full batch's micro-batches (2 or more)")
    if run_args.batch_size_warmup_start_tokens > ramp.full_tokens:
        raise ConfigError(f"batch_size_warmup_start_tokens: {run_args.batch_size_warmup_start_tokens:,.0f} tokens is "
                          f"more than the full batch ({ramp.full_tokens:,} tokens per step)")
    steps = (ramp.schedule(max_tokens=int(run_args.max_tokens)) if run_args.max_tokens
             else ramp.schedule(max_steps=args.max_steps))
    total = micro_tokens * sum(steps)
    if run_args.batch_size_warmup_tokens >= total:
        raise ConfigError(f"batch_size_warmup_tokens: {run_args.batch_size_warmup_tokens:,.0f} tokens is not shorter "
                          f"than the run ({total:,} tokens)")
    args.max_steps = len(steps)
    return steps


def _finish(trainer: PretrainingTrainer, result, model_args: ModelArguments, data_args: DataArguments,
            run_args: PretrainingArguments, objective_args: ObjectiveArguments, validation, seq_len: int,
            tokens_per_step: int, total_tokens: int, peak: float | None) -> int:
    """After training: final metrics and evaluation, the final model folder, the reports, the Hub upload."""
    args = trainer.args
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuardCallback))
    if guard.stop_reason:
        return report_error(guard.stop_reason, status=1)

    metrics = dict(result.metrics)
    if validation is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
        if last_eval.get("step") == trainer.state.global_step:  # the schedule just evaluated the final weights
            metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
        # eval_bits_per_byte is already there: PretrainingTrainer.log adds it to every evaluation of a clm run
        if "eval_loss" in metrics and objective_args.objective == "clm":  # else the loss covers scored tokens only
            metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded (fast resume); the final model is one full file set
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)  # weights, config with auto_map + code, tokenizer, generation config
    if trainer.ema is not None:  # the averaged weights as a model folder of their own, next to the final ones
        with trainer.ema.swapped_in():
            trainer.save_model(str(Path(args.output_dir) / "ema"))
    trainer.save_state()  # trainer_state.json: the log history and step count next to the weights
    if trainer.is_world_process_zero():
        write_reports(trainer, model_args, data_args, run_args, seq_len, tokens_per_step, total_tokens, peak,
                      metrics, objective_args)
    if args.push_to_hub:  # Trainer.push_to_hub would replace README.md with its generic card
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            push(args.output_dir, trainer.hub_model_id, args.hub_revision or "main", "Ember pretraining: final model")
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    transformers.logging.set_verbosity_warning()
    exit_rank(stop_quietly(main))
