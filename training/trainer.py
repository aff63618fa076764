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
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cli import ConfigError
from training.checkpoints import save_failure
from training.muon import OptimizerChoiceMixin
from training.optim import decay_parameter_names

STREAM_STATE_FILE = "stream_state_{rank}.json"


def is_rank_stream(dataset: Any) -> bool:
    """An iterable dataset with `state_dict()`/`load_state_dict()` (e.g. `StreamingPackedDataset`)."""
    return (isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "state_dict")
            and hasattr(dataset, "load_state_dict"))


class PretrainingTrainer(OptimizerChoiceMixin, Trainer):
    """The HF Trainer with Ember's weight-decay split (`decay_parameter_names`) and callback metrics in its logs.

    The Trainer builds the optimizer itself (`args.optim`, fused AdamW where available), so this works
    the same under DDP, FSDP (which refuses a ready-made optimizer) and DeepSpeed. With
    `optimizer_options.optimizer == "muon"` it builds Muon + AdamW instead (training/muon.py).

    Each periodic training log (the one with "loss") also gets the metrics of every callback that has a
    `training_log_metrics()` method (`ThroughputCallback`, `NonFiniteGuardCallback`), added before the log
    is recorded in `log_history` and handed to the printer and the reporters (TensorBoard, trackio, W&B).

    A stateful stream as `train_dataset` (`is_rank_stream`; each rank passes its own share, e.g. built on
    `data_prep.token_dataset.open_document_stream`) is read by a plain per-rank DataLoader: accelerate's
    would have rank 0 read for everyone or every rank read everything, and it reads a batch ahead. Each
    checkpoint holds every rank's stream state (`stream_state_<rank>.json`, written with the RNG state,
    before `trainer_state.json` marks the checkpoint complete), and a resumed run continues the stream from
    it instead of re-reading and dropping the consumed batches.
    """

    def __init__(self, *args, optimizer_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_options = optimizer_options  # an OptimizerArguments (training/arguments.py), or None: AdamW
        if is_rank_stream(self.train_dataset):
            if self.args.dataloader_num_workers:
                raise ValueError("dataloader_num_workers: must be 0 for a streaming train dataset (its resume state "
                                 "lives in the main process)")
            self.args.ignore_data_skip = True  # the stream's own state replaces skip-by-re-reading
        self.add_callback(_ProgressCallback(self))

    def get_train_dataloader(self) -> DataLoader:
        if not is_rank_stream(self.train_dataset):
            return super().get_train_dataloader()
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def _stream_state_path(self, checkpoint: str | os.PathLike) -> Path:
        return Path(checkpoint) / STREAM_STATE_FILE.format(rank=self.args.process_index)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if is_rank_stream(self.train_dataset):
            path = self._stream_state_path(output_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**self.train_dataset.state_dict(), "world_size": self.args.world_size}))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
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
        if not isinstance(model, FSDPModule):
            return super()._save(output_dir, state_dict)
        model.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            return super()._save(output_dir, state_dict)
        finally:
            model.__class__ = sharded_class

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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "training_log_metrics"):
                    logs.update(callback.training_log_metrics())
        super().log(logs, start_time)


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
