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

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from modeling.tokenizer_config import make_portable
from training.callbacks import use_log_lines
from training.optim import decay_parameter_names

STREAM_STATE_FILE = "stream_state_{rank}.json"


def is_rank_stream(dataset: Any) -> bool:
    """An iterable dataset with `state_dict()`/`load_state_dict()` (e.g. `StreamingPackedDataset`)."""
    return (isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "state_dict")
            and hasattr(dataset, "load_state_dict"))


class PretrainingTrainer(Trainer):
    """The HF Trainer with Ember's weight-decay split (`decay_parameter_names`) and callback metrics in its logs.

    The Trainer builds the optimizer itself (`args.optim`, fused AdamW where available), so this works
    the same under DDP, FSDP (which refuses a ready-made optimizer) and DeepSpeed.

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

    def __init__(self, *args, eval_bytes_per_token: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_bytes_per_token = eval_bytes_per_token
        use_log_lines(self)
        if is_rank_stream(self.train_dataset):
            if self.args.dataloader_num_workers:
                raise ValueError("dataloader_num_workers: must be 0 for a streaming train dataset (its resume state "
                                 "lives in the main process)")
            self.args.ignore_data_skip = True  # the stream's own state replaces skip-by-re-reading

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
            path.write_text(json.dumps(self.train_dataset.state_dict()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and is_rank_stream(self.train_dataset):
            path = self._stream_state_path(checkpoint)
            if not path.is_file():
                raise ValueError(f"{path}: missing; resume a streaming run from a checkpoint of a streaming run "
                                 f"with the same number of ranks ({self.args.world_size})")
            self.train_dataset.load_state_dict(json.loads(path.read_text()))

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
        if (folder / "tokenizer_config.json").is_file():
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.eval_bytes_per_token:
            # nats per token -> bits per byte of the evaluated text: comparable across tokenizers
            logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) / self.eval_bytes_per_token
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "training_log_metrics"):
                    logs.update(callback.training_log_metrics())
        super().log(logs, start_time)



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
