"""The HF `Trainer` for pretraining on packed blocks, and the collator of those blocks.

Typical wiring (what `recipes/pretrain.py` does)::

    model.config.use_cache = False  # a KV cache in the forward pass turns off document masking
    args = TrainingArguments(..., remove_unused_columns=False)  # keep "shift_labels" in the examples
    guard = NonFiniteGuardCallback()
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_packed,
                                 callbacks=[ThroughputCallback(...), guard])
    trainer.train()
    if guard.stop_reason: ...
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cli import ConfigError
from modeling import IGNORE_INDEX
from modeling.tokenizer_config import make_portable
from training.callbacks import use_log_lines
from training.checkpoints import ReadableSavesMixin, save_failure
from training.data_order import StepBatchSampler
from training.downstream import DownstreamEvalCallback
from training.ema import EMACallback
from training.muon import OptimizerChoiceMixin
from training.optim import decay_parameter_names
from training.plan import RunPlan
from training.spikes import DataState, LossSpikeCallback, global_mean

STREAM_STATE_FILE = "stream_state_{rank}.json"


def is_rank_stream(dataset: Any) -> bool:
    """An iterable dataset with `state_dict()`/`load_state_dict()` (e.g. `StreamingPackedDataset`)."""
    return (isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "state_dict")
            and hasattr(dataset, "load_state_dict"))


class PretrainingTrainer(OptimizerChoiceMixin, ReadableSavesMixin, Trainer):
    """The HF Trainer with Ember's weight-decay split (`decay_parameter_names`) and callback metrics in its logs.

    The Trainer builds the optimizer itself (`args.optim`, fused AdamW where available), so this works
    the same under DDP, FSDP (which refuses a ready-made optimizer) and DeepSpeed. With
    `optimizer_options.optimizer == "muon"` it builds Muon + AdamW instead (training/muon.py).

    Each periodic training log (the one with "loss") also gets the metrics of every callback that has a
    `training_log_metrics()` method (`ThroughputCallback`, `NonFiniteGuardCallback`), added before the log
    is recorded in `log_history` and handed to the printer and the reporters (TensorBoard, trackio, W&B).
    With `eval_bytes_per_token` (the evaluated text's UTF-8 bytes per token), each evaluation log also gets
    `eval_bits_per_byte`, which compares models whatever their tokenizers.

    A stateful stream as `train_dataset` (`is_rank_stream`; each rank passes its own share, e.g. built on
    `data_prep.documents.open_document_stream`) is read by a plain per-rank DataLoader: accelerate's
    would have rank 0 read for everyone or every rank read everything, and it reads a batch ahead. Each
    checkpoint holds every rank's stream state (`stream_state_<rank>.json`, written with the RNG state,
    before `trainer_state.json` marks the checkpoint complete), and a resumed run continues the stream from
    it instead of re-reading and dropping the consumed batches.
    """

    def __init__(self, *args, optimizer_options=None, z_loss: float = 0.0, plan: RunPlan | None = None,
                 loss_spikes: LossSpikeCallback | None = None, data_state: DataState | None = None,
                 ema: EMACallback | None = None, eval_bytes_per_token: float | None = None,
                 downstream: DownstreamEvalCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_bytes_per_token = eval_bytes_per_token
        use_log_lines(self)
        self.optimizer_options = optimizer_options  # an OptimizerArguments (training/arguments.py), or None: AdamW
        if z_loss < 0:
            raise ConfigError(f"z_loss: must be >= 0, got {z_loss}")
        self.z_loss = z_loss
        self._z_sum, self._z_count = 0.0, 0  # mean log(Z)^2 per token since the last log, for the logs
        self.plan = plan  # the run's batches (training/plan.py); with a batch ramp, Ember orders the blocks itself
        self.step_micro_batches = list(plan.step_micro_batches) if plan and plan.step_micro_batches else None
        self.loss_spikes, self.ema = loss_spikes, ema
        self.data_state = data_state if data_state is not None else DataState()
        self.step_sampler: StepBatchSampler | None = None
        self._step_loss = torch.zeros(())
        if is_rank_stream(self.train_dataset):
            if self.args.dataloader_num_workers:
                raise ValueError("dataloader_num_workers: must be 0 for a streaming train dataset (its resume state "
                                 "lives in the main process)")
            if loss_spikes is not None:
                raise ConfigError("loss_spike_zscore: a rollback skips packed blocks, and a stream has none; use the "
                                  "packed shards (streaming: false) or loss_spike_zscore: 0")
            self.args.ignore_data_skip = True  # the stream's own state replaces skip-by-re-reading
        for callback in (loss_spikes, ema):
            if callback is not None:
                self.add_callback(callback)
        if loss_spikes is not None:
            loss_spikes.step_loss = self._pop_step_loss
        self.add_callback(_ProgressCallback(self))
        if downstream is not None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise ConfigError("downstream_tasks: rank 0 evaluates its own copy of the model, which FSDP and "
                                  "DeepSpeed shard; run them on a checkpoint (evaluation/downstream.py) instead")
            self.add_callback(downstream.bind(self))
        if self.args.torch_compile:
            prepare_for_compile(self.model)

    @property
    def orders_blocks(self) -> bool:
        """Whether Ember orders the packed blocks itself (`StepBatchSampler`): with a batch ramp, or with loss-spike
        rollbacks (which skip blocks); otherwise the Trainer's own sampler reads them."""
        return not is_rank_stream(self.train_dataset) and (
            self.step_micro_batches is not None or self.loss_spikes is not None or bool(self.data_state.skipped))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            saved = DataState.read(resume_from_checkpoint)  # the blocks skipped before that checkpoint
            if saved is not None:
                self.data_state.merge(saved)
        if self.loss_spikes is not None:
            self.loss_spikes.restart_at = self.data_state.restarts()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        """The weights of `checkpoint` into this trainer's model (as a resume loads them), e.g. to score data from
        them after a loss spike."""
        self._load_from_checkpoint(checkpoint)

    @torch.no_grad()
    def block_losses(self, blocks: list[int]) -> dict[int, float]:
        """{block: its mean loss} of training blocks under the current weights, forward only, one block at a time.
        The ranks share the work (the same number of forwards each, as sharded models need) and all get every
        value; the random state is left as it was (a collator may draw masks)."""
        model, world, rank = self.model, self.args.world_size, self.args.process_index
        values = torch.zeros(len(blocks), device=self.args.device)
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            for index in range(rank, rank + world * math.ceil(len(blocks) / world), world):
                example = self.train_dataset[blocks[min(index, len(blocks) - 1)]]
                loss = model(**self._prepare_inputs(self.data_collator([example]))).loss
                if index < len(blocks):
                    values[index] = loss.float()
        model.train(was_training)
        if world > 1:
            torch.distributed.all_reduce(values)
        return dict(zip(blocks, values.tolist()))

    def get_train_dataloader(self) -> DataLoader:
        if self.orders_blocks:
            args = self.args
            if args.train_sampling_strategy not in ("random", "sequential"):
                raise ConfigError(f"train_sampling_strategy: {args.train_sampling_strategy} cannot be combined with "
                                  "a batch-size warmup or loss-spike rollbacks; use random or sequential")
            steps = self.step_micro_batches or [args.gradient_accumulation_steps] * args.max_steps
            self.step_sampler = StepBatchSampler(
                len(self.train_dataset), self._train_batch_size, args.world_size, args.gradient_accumulation_steps,
                steps, seed=args.data_seed if args.data_seed is not None else args.seed,
                shuffle=args.train_sampling_strategy == "random", skipped=self.data_state.skipped)
            loader = DataLoader(self.train_dataset, batch_sampler=self.step_sampler, collate_fn=_with_empty_slots(
                self.data_collator), num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory and torch.cuda.is_available())
            return self.accelerator.prepare(loader)
        if not is_rank_stream(self.train_dataset):
            return super().get_train_dataloader()
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches; during a batch ramp the first slots are empty ({}), and the loss is normalised
        by the tokens of the real ones. A stream gets its empty slots here; packed blocks from `StepBatchSampler`."""
        if self.step_micro_batches is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        wanted = num_batches
        if is_rank_stream(self.train_dataset):
            wanted = min(num_batches, self.step_micro_batches[min(self.state.global_step,
                                                                  len(self.step_micro_batches) - 1)])
        batches = []
        for _ in range(wanted):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if is_rank_stream(self.train_dataset):
            batches = [{}] * (num_batches - wanted) + batches
        return batches, self._get_num_items_in_batch([batch for batch in batches if batch], device)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not inputs:  # an empty slot of a ramped step: nothing to compute
            return torch.zeros((), device=self.args.device)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_spikes is not None:
            self._step_loss = self._step_loss.to(loss.device) + loss.detach().float()
        return loss

    def _pop_step_loss(self) -> float:
        """The mean loss of the step just taken over the whole global batch (a collective: every rank calls it).
        The micro-batch losses add up to this rank's share of it (they are normalised by the global token count
        and scaled by the number of ranks), so their mean over the ranks is the step's loss."""
        value = global_mean(self._step_loss)
        self._step_loss = torch.zeros(())
        return value

    def _stream_state_path(self, checkpoint: str | os.PathLike) -> Path:
        return Path(checkpoint) / STREAM_STATE_FILE.format(rank=self.args.process_index)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # Written, like the RNG state, before trainer_state.json marks the checkpoint complete.
        if is_rank_stream(self.train_dataset):
            path = self._stream_state_path(output_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**self.train_dataset.state_dict(), "world_size": self.args.world_size}))
        if self.args.should_save and (self.orders_blocks or self.data_state.rollbacks):
            self.data_state.write(output_dir)
        if self.ema is not None:
            self.ema.save(output_dir, self.args.process_index)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self.ema is not None:
            self.ema.load(checkpoint, self.args.process_index)
        if checkpoint is not None and is_rank_stream(self.train_dataset):
            path = self._stream_state_path(checkpoint)
            if not path.is_file():
                raise ValueError(f"{path}: missing; resume a streaming run from a checkpoint of a streaming run "
                                 f"with the same number of ranks ({self.args.world_size})")
            state = json.loads(path.read_text())
            # Each rank's stream is its own share of the documents: another number of ranks would split them
            # differently, and the saved positions would no longer say where any share stands.
            saved_ranks = len(list(Path(checkpoint).glob(STREAM_STATE_FILE.format(rank="*"))))
            saved_world = state.get("world_size", saved_ranks)
            if saved_world != self.args.world_size or saved_ranks != self.args.world_size:
                raise ConfigError(f"resume_from_checkpoint: {checkpoint} holds the streams of {saved_world} ranks "
                                  f"and this run has {self.args.world_size}; resume a streaming run with the "
                                  "same number of processes")
            self.train_dataset.load_state_dict(state)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            return super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:  # torch.save's writer reports a full disk as a RuntimeError
            failed = err
        # The tracebacks keep the failed writer and its open file alive, and with it the space of the file.
        chained: BaseException | None = failed
        while chained is not None:
            chained.__traceback__ = None
            chained = chained.__context__
        gc.collect()
        # Weights plus AdamW's two moments: what a checkpoint holds, when no earlier one shows its size.
        estimate = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        failure = save_failure(failed, self.args.output_dir, folder, estimate)
        if failure is None:
            raise failed
        raise failure from None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP2's fully_shard swaps the model's class for a subclass made inside torch (FSDPEmberForCausalLM);
        # save_pretrained would copy that torch module as the model's code and point auto_map at it, and the
        # folder would not load. The Trainer hands a gathered state dict here, so save under the model's own class.
        from torch.distributed.fsdp import FSDPModule

        model = self.accelerator.unwrap_model(self.model)
        sharded_class = type(model)
        if isinstance(model, FSDPModule):
            model.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = sharded_class
        folder = Path(output_dir or self.args.output_dir)
        # Only the writer: with a model sharded at load time (tp_size) every rank comes through here to join the
        # gathers, and the others would read a tokenizer the writer may still be writing.
        if self.args.should_save and (folder / "tokenizer_config.json").is_file():
            make_portable(folder)  # the saved tokenizer loads in transformers 4.x too

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied output head is not in the checkpoint (it is the embedding), so every resume of a tied model
        # "misses" it; the Trainer re-ties silently only for models listing it in `_keys_to_ignore_on_save`,
        # and warns for all others (stock Llama included). Tied keys are not missing: re-tie, warn about the rest.
        model = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) < len(load_result.missing_keys):
            model.tie_weights()
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The model's loss, plus in training `z_loss` x mean over scored tokens of log(Z)^2, Z the softmax
        normaliser of the output logits (PaLM's auxiliary loss, Chowdhery et al. 2022): it keeps log Z near 0, so
        the logits cannot drift to magnitudes where bf16 softmax loses precision. Normalised like the model's
        loss (by `num_items_in_batch` across the accumulated batch and the ranks), so accumulation stays exact."""
        if not self.z_loss or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # The tokens the objective scores: shifted targets (clm, prefix_lm, ul2), or the masked positions (mlm).
        targets = inputs["shift_labels" if "shift_labels" in inputs else "labels"] != IGNORE_INDEX
        squares = (torch.logsumexp(outputs.logits.float(), dim=-1).square() * targets).sum()
        count = targets.sum()
        if num_items_in_batch is None:
            penalty = squares / count.clamp(min=1)
        else:
            penalty = squares / num_items_in_batch
            if self.args.average_tokens_across_devices:  # as the Trainer scales the model's loss
                penalty = penalty * (self.accelerator.num_processes // self.get_tp_size())
        self._z_sum = self._z_sum + squares.detach()  # tensors: no host sync per micro-batch
        self._z_count = self._z_count + count
        loss = loss + self.z_loss * penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.eval_bytes_per_token:
            # nats per token -> bits per byte of the evaluated text: comparable across tokenizers
            logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) / self.eval_bytes_per_token
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "training_log_metrics"):
                    logs.update(callback.training_log_metrics())
            if self.step_micro_batches is not None:  # the batch-size ramp, for the run report's plot
                logs["batch_tokens"] = self.plan.step_tokens(self.state.global_step)
            if self.loss_spikes is not None:  # rollbacks so far, resumes included: a live dashboard shows them
                logs["rollbacks"] = len(self.data_state.rollbacks)
            if self.z_loss and int(self._z_count):  # this rank's tokens; the loss includes z_loss x this
                logs["z_loss"] = float(self._z_sum / self._z_count)
                self._z_sum, self._z_count = 0.0, 0
        super().log(logs, start_time)


def prepare_for_compile(model: nn.Module) -> None:
    """Let `torch.compile(fullgraph=True)` trace a training step of `model` without a graph break.

    An MoE model records its router logits for the load-balancing loss through transformers' output-capturing
    hooks, which it installs on the first forward that needs them, under a `threading.Lock` that dynamo cannot
    enter. Installed beforehand, the compiled step finds them in place. Dense models need nothing.
    """
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    if getattr(model.config, "is_moe", False):
        maybe_install_capturing_hooks(model.base_model)


class _ProgressCallback(TrainerCallback):
    """Keeps the logged `epoch` meaningful across resumes.

    For a stream (no length) the Trainer's epoch is the fraction of `max_steps` done, counted from the
    micro-batches of the current `train()` call; a resumed run, which cannot skip batches of a stream, would
    count from zero again. Set from the step count instead, it equals the uninterrupted run's value exactly.
    """

    def __init__(self, trainer: PretrainingTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if is_rank_stream(self.trainer.train_dataset) and state.max_steps > 0:
            state.epoch = state.global_step / state.max_steps
        elif self.trainer.step_sampler is not None:  # passes over the blocks, as the Trainer's sampler would count
            state.epoch = self.trainer.step_sampler.epoch_at(state.global_step)


def _with_empty_slots(collate: Callable) -> Callable:
    """`collate`, except that an empty list of examples (an empty slot of `StepBatchSampler`) becomes {}."""

    def collate_or_empty(examples: list) -> dict:
        return collate(examples) if examples else {}

    return collate_or_empty


def collate_packed(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack `PackedDataset` examples into a batch for `EmberForCausalLM` under the Trainer.

    Returns {"input_ids", "labels", "shift_labels"[, "position_ids"]}, each (batch, seq_len) and contiguous.
    The loss reads `shift_labels` (already shifted, so all seq_len positions are targets); `labels` holds
    the same values because the model computes a loss only when `labels` is given and the Trainer counts
    `num_items_in_batch` (the gradient-accumulation normaliser) only for batches that have it. It is a
    separate copy: code that edits or shards batch tensors in place (context parallelism does) must not
    touch one tensor twice. No attention mask: with `position_ids` and no KV cache, transformers masks
    attention across document boundaries itself.
    """
    if not examples:
        raise ValueError("collate_packed: no examples")
    keys = examples[0].keys()
    if "shift_labels" not in keys:
        # The Trainer drops example keys that `forward` does not name unless told not to.
        raise ValueError(f"collate_packed: examples have no 'shift_labels' (keys: {sorted(keys)}); "
                         "set TrainingArguments(remove_unused_columns=False)")
    if any(example.keys() != keys for example in examples):
        raise ValueError("collate_packed: examples have different keys (mixed return_position_ids?)")
    shift_labels = torch.stack([example["shift_labels"] for example in examples])
    batch = {
        "input_ids": torch.stack([example["input_ids"] for example in examples]),
        "labels": shift_labels.clone(),
        "shift_labels": shift_labels,
    }
    if "position_ids" in keys:
        batch["position_ids"] = torch.stack([example["position_ids"] for example in examples])
    return batch
