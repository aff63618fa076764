"""The pieces of a pretraining run that `recipes/pretrain.py` tells as a story: the settings, the data, the
model, the Trainer (built again after a loss-spike rollback), and the finish: final metrics, the model folder,
the reports and the Hub upload."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import GenerationConfig, PreTrainedModel, SchedulerType, TrainingArguments, set_seed

from cli import ConfigError, report_error
from data_prep.documents import open_document_stream
from data_prep.pipeline import packing_settings, split_bytes_per_token
from data_prep.token_dataset import PackedDataset, StreamingPackedDataset
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from evaluation.perplexity import perplexity
from modeling import EmberConfig, EmberForCausalLM, EmberForMaskedLM, sizing
from modeling.loading import load_model
from reporting.model_card import write_model_card
from reporting.run_report import ETA_FILE, REPORT_DIR, SETTINGS_FILE, write_run_report
from training.arguments import (
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    PretrainingArguments,
    training_setting,
)
from training.callbacks import EtaCallback, NonFiniteGuardCallback, ThroughputCallback, device_peak_flops
from training.downstream import DownstreamEvalCallback
from training.ema import EMACallback
from training.hub import push
from training.interrupt import StopOnInterrupt
from training.objectives import build_collator
from training.optim import lr_scheduler_kwargs
from training.plan import RunPlan
from training.spikes import DataState, LossSpikeCallback
from training.trainer import PretrainingTrainer

# TrainingArguments shown in the run report next to the recipe's own keys.
REPORTED_TRAINING_KEYS = ("learning_rate", "warmup_steps", "weight_decay", "max_steps", "max_grad_norm",
                          "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "seed")


class PretrainingSettings(NamedTuple):
    """A pretraining run's parsed settings, in the order `recipes/pretrain.py` parses them."""

    model: ModelArguments
    data: DataArguments
    run: PretrainingArguments
    objective: ObjectiveArguments
    training: TrainingArguments


def check_settings(settings: PretrainingSettings) -> None:
    """Combinations of settings a run cannot honour, refused before anything loads."""
    model_args, run_args, args = settings.model, settings.run, settings.training
    if model_args.tp_size > 1 and args.save_strategy != "no" and not args.save_only_model:
        raise ConfigError("tp_size: the Trainer cannot checkpoint the optimizer state of a model sharded at load "
                          "time; pass --save_only_model=true (weights only, no resume) or --save_strategy=no")
    if run_args.loss_spike_zscore and args.save_strategy == "no":
        raise ConfigError("loss_spike_zscore: a rollback needs checkpoints to go back to; set save_strategy "
                          "and save_steps")
    if run_args.downstream_tasks and model_args.tp_size > 1:
        raise ConfigError("downstream_tasks: rank 0 evaluates its own copy of the model, which tensor parallel "
                          "shards; run them on a checkpoint (evaluation/downstream.py) instead")


@dataclasses.dataclass
class PretrainingData:
    """The run's data: tokenizer, training blocks (packed shards or a stream), validation blocks (or None), the
    block length, and the validation text's UTF-8 bytes per token where the loss scores every token (clm), which
    turns an evaluation loss into bits per byte."""

    tokenizer: object
    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset | None
    seq_len: int
    eval_bytes_per_token: float | None


def load_data(settings: PretrainingSettings) -> PretrainingData:
    """The data_prep run in `data_dir`, checked against its tokenizer; `max_eval_blocks` spread evenly over the
    validation blocks."""
    data_args, args = settings.data, settings.training
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
    # bits per byte of the validation text: only where the loss scores every token of it
    bytes_per_token = (split_bytes_per_token(data_dir, "validation") if settings.objective.objective == "clm"
                       else None)
    return PretrainingData(tokenizer, train, validation, train.seq_len, bytes_per_token)


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


def prepare_training_args(settings: PretrainingSettings, plan: RunPlan, model: PreTrainedModel,
                          has_validation: bool) -> None:
    """The Trainer's arguments as the plan and the model need them: the plan's steps, the schedule's own keys,
    no evaluation without validation data, the collators' extra columns kept."""
    args, run_args = settings.training, settings.run
    args.max_steps = plan.max_steps
    scheduler, args.lr_scheduler_kwargs = lr_scheduler_kwargs(run_args.schedule, run_args.min_lr_ratio,
                                                              max_steps=args.max_steps)
    args.lr_scheduler_type = SchedulerType(scheduler)
    if args.eval_strategy != "no" and not has_validation:
        args.eval_strategy = "no"
    args.remove_unused_columns = False  # shift_labels and position_ids are not forward() argument names
    if args.ddp_find_unused_parameters is None:  # only MoE layers can leave parameters (experts) without gradient
        args.ddp_find_unused_parameters = bool(model.config.is_moe)


def describe_run(settings: PretrainingSettings, plan: RunPlan, data: PretrainingData, model: PreTrainedModel) -> None:
    """One line on rank 0: parameters, blocks, tokens per step, steps, FLOPs per token, ranks (and the tensor
    parallel layout)."""
    args, model_args = settings.training, settings.model
    if args.process_index != 0:
        return
    blocks = "streamed blocks" if settings.data.streaming else f"{len(data.train):,} blocks"
    # ZeRO-3 builds the model already partitioned: each parameter keeps its full size in ds_numel
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    batch = f"{plan.tokens_per_step:,} tokens/step" if plan.step_micro_batches is None else (
        f"{plan.step_tokens(1):,} -> {plan.tokens_per_step:,} tokens/step over "
        f"{settings.run.batch_size_warmup_tokens:,.0f} tokens ({plan.total_tokens:,} tokens)")
    print(f"[pretrain] {parameters:,} parameters | {blocks} of {plan.seq_len} | {batch} | {plan.max_steps} steps | "
          f"{sizing.flops_per_token(model.config, plan.seq_len) / 1e9:.3f} GFLOP/token | world size {args.world_size}")
    if model_args.tp_size > 1:
        from torch.distributed.tensor import DTensor  # torch.distributed: only a tensor-parallel run needs it

        sharded = [n for n, p in model.named_parameters()
                   if isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)]
        print(f"[pretrain] tensor parallel {model_args.tp_size} x data parallel {plan.data_parallel}: "
              f"{len(sharded)} parameters sharded")


class PretrainingTrainers:
    """The run's `PretrainingTrainer`, built by `train_with_rollbacks` once per attempt: the first around the model
    already built, each one after a loss-spike rollback around a fresh model (the checkpoint's weights load into
    it; nothing of the abandoned attempt is kept)."""

    def __init__(self, settings: PretrainingSettings, plan: RunPlan, data: PretrainingData, model: PreTrainedModel):
        self.settings, self.plan, self.data, self._model = settings, plan, data, model
        run_args = settings.run
        self.collator = build_collator(settings.objective, data.tokenizer, plan.seq_len)
        self.flops_per_token = sizing.flops_per_token(model.config, plan.seq_len)
        self.peak_flops = device_peak_flops(run_args.peak_flops)
        self.interrupt = StopOnInterrupt()  # Ctrl-C: finish the step, save it, stop
        self.downstream = (DownstreamEvalCallback(run_args.downstream_tasks, run_args.downstream_include_path,
                                                  run_args.downstream_steps, run_args.downstream_limit)
                           if run_args.downstream_tasks else None)

    def __call__(self, data_state: DataState) -> PretrainingTrainer:
        settings, run_args, args = self.settings, self.settings.run, self.settings.training
        model, self._model = self._model, None
        if model is None:  # a rollback
            set_seed(args.seed)
            model = build_model(settings.model, self.data.tokenizer, self.plan.seq_len, settings.objective.objective)
        return PretrainingTrainer(
            model=model, args=args, train_dataset=self.data.train, eval_dataset=self.data.validation,
            data_collator=self.collator, processing_class=self.data.tokenizer, optimizer_options=run_args,
            z_loss=run_args.z_loss, plan=self.plan, data_state=data_state,
            loss_spikes=(LossSpikeCallback(run_args.loss_spike_zscore, run_args.loss_spike_window,
                                           run_args.loss_spike_skip_ahead) if run_args.loss_spike_zscore else None),
            eval_bytes_per_token=self.data.eval_bytes_per_token,
            ema=EMACallback(run_args.ema_decay) if run_args.ema_decay else None, downstream=self.downstream,
            callbacks=[ThroughputCallback(self.flops_per_token, self.plan.step_tokens, self.peak_flops,
                                          args.world_size),
                       NonFiniteGuardCallback(run_args.max_consecutive_nonfinite), self.interrupt,
                       EtaCallback(path=Path(args.output_dir) / REPORT_DIR / ETA_FILE)])


def finish_pretraining(trainer: PretrainingTrainer, result, settings: PretrainingSettings, plan: RunPlan) -> int:
    """After training: final metrics and evaluation, the final model folder, the reports, the Hub upload."""
    args = trainer.args
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuardCallback))
    if guard.stop_reason:
        return report_error(guard.stop_reason, status=1)

    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
        if last_eval.get("step") == trainer.state.global_step:  # the schedule just evaluated the final weights
            metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
        # eval_bits_per_byte is already there: PretrainingTrainer.log adds it to every evaluation of a clm run
        if "eval_loss" in metrics and settings.objective.objective == "clm":  # else: scored tokens only
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
        write_reports(trainer, settings, plan, metrics)
    if args.push_to_hub:  # Trainer.push_to_hub would replace README.md with its generic card
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            push(args.output_dir, trainer.hub_model_id, args.hub_revision or "main", "Ember pretraining: final model")
    return 0


def write_reports(trainer: PretrainingTrainer, settings: PretrainingSettings, plan: RunPlan, metrics: dict) -> None:
    """run_report/ (plots + report.md, sizing estimate vs measured) and the model card README.md."""
    model_args, data_args, run_args, objective = settings.model, settings.data, settings.run, settings.objective
    args, config, output_dir = trainer.args, trainer.model.config, Path(trainer.args.output_dir)
    strategy = "zero3" if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled else "ddp"
    checkpointing = training_setting(args, "activation_checkpointing")
    # position_ids mask packed documents apart (a mask for sdpa and eager); gradients outlive a step under
    # DDP/FSDP/ZeRO and accumulation, while one process without accumulation frees them every step.
    memory = sizing.memory_per_gpu(config, args.world_size, strategy, args.per_device_train_batch_size, plan.seq_len,
                                   checkpointing, param_bytes=2 if args.bf16 else 4,
                                   flash_attention=model_args.attn_implementation != "eager",
                                   attention_mask=data_args.position_ids
                                   and model_args.attn_implementation in ("sdpa", "eager"),
                                   gradients_persist=args.world_size > 1 or args.gradient_accumulation_steps > 1)
    recipe = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(run_args),
              **dataclasses.asdict(objective), **{key: getattr(args, key) for key in REPORTED_TRAINING_KEYS}}
    (output_dir / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_DIR / SETTINGS_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    steps = trainer.state.global_step
    peak = device_peak_flops(run_args.peak_flops)
    write_run_report(output_dir, trainer.state.log_history, {
        "config": recipe, "tokens_per_step": plan.tokens_per_step, "rollbacks": trainer.data_state.rollbacks,
        "objective": objective.objective,
        **({"tokens_seen": plan.tokens_after(steps)} if plan.step_micro_batches else {}),
        "estimated_memory_gb": memory["total"] / 2**30, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "estimated_seconds": (sizing.training_time(config, plan.total_tokens, args.world_size, peak,
                                                   run_args.expected_mfu, plan.seq_len) if peak else None)})
    write_model_card(output_dir, model_name=output_dir.name, config=config, datasets=[Path(data_args.data_dir).name],
                     metrics=metrics, repo_id=args.hub_model_id, objective=objective.objective, training={
                         "tokens": plan.tokens_after(steps), "steps": steps, "tokens_per_step": plan.tokens_per_step,
                         "seq_len": plan.seq_len, "global_batch_size": plan.global_batch_size,
                         "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                         "lr_schedule": f"{run_args.schedule}, {args.warmup_steps} warmup steps, "
                                        f"min {run_args.min_lr_ratio} x peak",
                         "precision": "bf16" if args.bf16 else "fp32", "world_size": args.world_size,
                         "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                         "wall_seconds": metrics.get("train_runtime")})
