"""Held-out numbers for each pretraining objective of `training.objectives`.

- `objective_metrics`: the tokens an objective scores, scored on held-out packed blocks through that
  objective's own collator with a fixed seed (every model compared sees the same masks and splits):
  mean loss (nats per scored token), accuracy of the top prediction, and bits per byte of the scored
  text. For `mlm` that is the masked-token loss and accuracy; for `prefix_lm` the suffix's bits per
  byte; for `clm` it equals the Trainer's eval_loss.
- `pseudo_perplexity`: a masked LM's pseudo-perplexity (Salazar et al. 2020): every token is masked in
  turn and scored from all the others, PPPL = exp(-mean log P(token | rest)).

Bits per byte counts the UTF-8 bytes of the scored target tokens (`token_byte_lengths`); special
tokens (EOS, sentinels) are scored tokens with no bytes.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Any

import torch

from modeling import IGNORE_INDEX


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    A byte-level BPE piece spells one byte per character, so its length is exact even for pieces that hold
    part of a character; other tokenizers are measured by decoding each piece alone.
    """
    byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or piece is None:
            continue
        lengths[token_id] = len(piece) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "position_ids", "attention_mask", "block_sequence_ids")
    return {key: batch[key].to(device) for key in keys if key in batch}


@torch.no_grad()
def objective_metrics(model, dataset, collator, *, byte_lengths: torch.Tensor | None = None, batch_size: int = 8,
                      max_blocks: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Loss, accuracy and bits per byte of the tokens `collator` scores, over `dataset`'s blocks in order.

    `collator` is one of `training.objectives`' (or `collate_packed`); a collator that draws at random gets a
    generator seeded with `seed` first, and collates the blocks one at a time, so the draws do not depend on
    `batch_size`. Targets are `shift_labels` (causal objectives) or `labels` (masked LM), aligned with the
    logits either way.
    """
    if hasattr(collator, "generator"):
        collator.generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices = range(len(dataset) if max_blocks is None else min(max_blocks, len(dataset)))
    total_nll, correct, tokens, num_bytes = 0.0, 0, 0, 0
    iterator = iter(indices)
    while chunk := list(islice(iterator, batch_size)):
        rows = [collator([dataset[i]]) for i in chunk]
        batch = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        targets = batch["shift_labels"] if "shift_labels" in batch else batch["labels"]
        scored = targets != IGNORE_INDEX
        logits = model(**_model_inputs(batch, device)).logits.float().cpu()
        picked, wanted = logits[scored], targets[scored]
        total_nll += torch.nn.functional.cross_entropy(picked, wanted, reduction="sum").item()
        correct += int((picked.argmax(-1) == wanted).sum())
        tokens += int(scored.sum())
        if byte_lengths is not None:
            num_bytes += int(byte_lengths[wanted].sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("dataset: no scored tokens in the evaluated blocks")
    return {
        "tokens": tokens,
        "loss": total_nll / tokens,
        "accuracy": correct / tokens,
        "bytes": num_bytes if byte_lengths is not None else None,
        "bits_per_byte": total_nll / (math.log(2) * num_bytes) if byte_lengths is not None and num_bytes else None,
        "blocks": len(indices),
    }


@torch.no_grad()
def pseudo_perplexity(model, dataset, mask_token_id: int, special_ids: list[int] | set[int], *,
                      max_blocks: int = 4, max_tokens: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Pseudo-perplexity of a masked LM over the first `max_blocks` blocks of `dataset`.

    Each non-special token of a block (the first `max_tokens` of them, if set) is masked alone and scored
    from the rest of the block; the block's `position_ids` keep its packed documents apart as in training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    special = torch.tensor(sorted(special_ids))
    total, count = 0.0, 0
    for index in range(min(max_blocks, len(dataset))):
        example = dataset[index]
        ids = example["input_ids"]
        positions = torch.nonzero(~torch.isin(ids, special)).squeeze(1)[:max_tokens]
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            inputs = ids.repeat(len(chunk), 1)
            inputs[torch.arange(len(chunk)), chunk] = mask_token_id
            batch = {"input_ids": inputs}
            if "position_ids" in example:
                batch["position_ids"] = example["position_ids"].repeat(len(chunk), 1)
            logits = model(**_model_inputs(batch, device)).logits.float().cpu()
            log_probs = logits[torch.arange(len(chunk)), chunk].log_softmax(-1)
            total -= log_probs[torch.arange(len(chunk)), ids[chunk]].sum().item()
            count += len(chunk)
    model.train(was_training)
    if count == 0:
        raise ValueError("dataset: no tokens to score")
    return {"tokens": count, "mean_nll": total / count, "pseudo_perplexity": math.exp(total / count)}


__all__ = ["objective_metrics", "pseudo_perplexity", "token_byte_lengths"]
