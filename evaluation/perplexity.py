"""Sliding-window perplexity and bits per byte of a causal language model.

    from data_prep.documents import read_documents
    from evaluation.perplexity import evaluate_perplexity
    from modeling.loading import load_checkpoint
    model, tokenizer = load_checkpoint("outputs/ember-125m", device="auto")
    result = evaluate_perplexity(model, tokenizer, read_documents("data/stdlib/documents/validation"), stride=512)
    print(result.perplexity, result.bits_per_byte); result.write_json("ppl.json")

Windows. A token stream t[0..n] has n prediction targets t[1..n]; t[0] is context only. A window is
`window` consecutive model inputs t[a:e] and predicts the token after each of them, t[a+1:e+1]. The
first window is t[0:window] and scores all `window` of its targets. Each later window ends `stride`
targets further on, keeps `window` inputs, and scores only its last `stride` targets (the ones no earlier
window scored), so every target is scored exactly once, with at least `window - stride + 1` tokens of
context wherever the stream is that long. The last window ends at the stream's end and scores what is left; a
stream shorter than one window is a single window. stride == window gives disjoint windows, the layout of
the packed training blocks and of lm-eval's `loglikelihood_rolling` (which fixes stride == window).

Streams. By default every document is its own stream, scored independently of the others:
[EOS] + tokens(text), positions 0, 1, 2, ... The EOS in front makes the document's first token a target:
in Ember's packed training data every document begins right after an EOS, so that is the context the
model knows for "start of a document". (lm-eval prepends the BOS token, the same id in Ember tokenizers;
pass `prefix_token_id` to match a model trained with another convention.) `concatenate=True` instead lays
the documents out as the training data does, [EOS] d1 [EOS] d2 [EOS] ... dn [EOS], and scores that one
stream; the EOS targets count as tokens there, as they do in the training loss. Packed token shards
(`data_prep` `tokens/<split>/`) are scored as their training blocks: shard by shard, the tokens the
blocks cover. In both of those modes position ids restart after every EOS, as in pretraining, and
transformers then keeps attention inside each document.

Metrics. Token count, UTF-8 byte count of the scored text, mean NLL per token (nats), perplexity
exp(mean NLL) and bits per byte = total NLL / (ln 2 * total bytes). Perplexity depends on the
tokenizer; bits per byte does not, so it is the number to compare across models with different ones.

Batching. Windows from any documents are batched together, right-padded. With causal attention no real
position can attend to a pad position that follows it, so no 2D attention mask is passed: it would also
switch off transformers' document masking from position ids. Padded positions are not scored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_prep.documents import read_documents
from data_prep.token_dataset import PackedDataset, document_position_ids, is_packed_shards
from modeling import IGNORE_INDEX

# exp() overflows a float past ~709.78 nats; a mean loss that high is reported as an infinite perplexity.
_MAX_EXP_ARGUMENT = 709.0


def perplexity(mean_nll: float | None) -> float | None:
    """exp(mean NLL per token, in nats): the one definition every Ember report uses.

    inf where that overflows a float, nan for nan, None for no loss.
    """
    if mean_nll is None:
        return None
    return math.inf if mean_nll > _MAX_EXP_ARGUMENT else math.exp(mean_nll)


@dataclass
class PerplexityResult:
    """What `evaluate_perplexity` and `evaluate_packed_perplexity` measured. `to_dict()` is the JSON form."""

    num_tokens: int  # scored targets
    num_bytes: int | None  # UTF-8 bytes of the scored text; None when unknown
    total_nll: float  # nats, summed over the scored tokens
    mean_nll: float  # nats per token
    perplexity: float
    bits_per_byte: float | None
    num_documents: int  # documents read, empty ones included
    skipped_documents: int  # empty documents (nothing to score)
    window: int
    stride: int
    mode: str  # "documents", "concatenated" or "packed"
    note: str | None = None  # why bits per byte is unavailable, or what was left out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_json(self, path: str | Path, **extra: Any) -> None:
        """Write the result (plus `extra` keys such as the model and data paths) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Windows and scoring
# ---------------------------------------------------------------------------------------------------------------


def window_spans(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, num_scored) per window over a stream with `num_targets` targets (num_targets + 1 tokens).

    The window feeds tokens [start, end) to the model and scores its last `num_scored` predictions,
    i.e. the targets at stream positions end - num_scored + 1 .. end. See the module docstring.
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"window {window}, stride {stride}: need window >= 1 and 1 <= stride <= window")
    spans: list[tuple[int, int, int]] = []
    scored_until, end = 0, min(window, num_targets)
    while scored_until < num_targets:
        spans.append((max(0, end - window), end, end - scored_until))
        scored_until, end = end, min(end + stride, num_targets)
    return spans


def _stream_windows(streams: Iterable[torch.Tensor], window: int, stride: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(tokens of one window plus its last target, number of trailing targets to score) for every window."""
    for stream in streams:
        for start, end, num_scored in window_spans(len(stream) - 1, window, stride):
            yield stream[start:end + 1], num_scored


def _position_ids(inputs: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """0, 1, 2, ...; with `eos_id`, restarting after every EOS as in the packed training data."""
    if eos_id is None:
        return torch.arange(len(inputs))
    return torch.from_numpy(document_position_ids(inputs.numpy(), eos_id))


@torch.inference_mode()
def _score_batch(model, batch: list[tuple[torch.Tensor, int]], pad_id: int, reset_eos_id: int | None
                 ) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored targets of a batch of windows."""
    length = max(len(tokens) - 1 for tokens, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (tokens, num_scored) in enumerate(batch):
        size = len(tokens) - 1
        input_ids[row, :size] = tokens[:-1]
        labels[row, size - num_scored:size] = tokens[size - num_scored + 1:]
        positions = _position_ids(tokens[:-1], reset_eos_id)
        # Pad positions continue the last document's count, so they never look like a new document.
        position_ids[row, :size] = positions
        position_ids[row, size:] = positions[-1] + 1 + torch.arange(length - size)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False).logits.float()
    scored = (labels != IGNORE_INDEX).to(device)
    targets = labels.clamp(min=0).to(device).unsqueeze(-1)
    # One fused log-softmax over the logits as they are, then the targets' entries: indexing the scored rows out
    # first copied the whole (batch x window x vocabulary) tensor, and cross-entropy's kernel is slower on CPU.
    token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    return float(token_nll[scored].sum()), int(scored.sum())


def _resolve_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        if not max_positions:
            raise ValueError("window: the model config has no max_position_embeddings; pass a window")
        window = int(max_positions)
    if max_positions and window > max_positions:
        raise ValueError(f"window: {window} exceeds the model's max_position_embeddings {max_positions}")
    stride = max(1, window // 2) if stride is None else stride
    window_spans(0, window, stride)  # validates
    return window, stride


def _score_streams(model, streams: Iterable[torch.Tensor], window: int, stride: int, batch_size: int, pad_id: int,
                   reset_eos_id: int | None, progress: bool, total_tokens: int | None = None) -> tuple[float, int]:
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} (need >= 1)")
    was_training = model.training
    model.eval()
    total_nll, total_tokens_scored, batch = 0.0, 0, []
    bar = tqdm(total=total_tokens, unit="tok", desc="perplexity", disable=None if progress else True)
    try:
        for item in _stream_windows(streams, window, stride):
            batch.append(item)
            if len(batch) == batch_size:
                nll, scored = _score_batch(model, batch, pad_id, reset_eos_id)
                total_nll, total_tokens_scored, batch = total_nll + nll, total_tokens_scored + scored, []
                bar.update(scored)
        if batch:
            nll, scored = _score_batch(model, batch, pad_id, reset_eos_id)
            total_nll, total_tokens_scored = total_nll + nll, total_tokens_scored + scored
            bar.update(scored)
    finally:
        bar.close()
        model.train(was_training)
    return total_nll, total_tokens_scored


def _result(total_nll: float, num_tokens: int, num_bytes: int | None, **fields: Any) -> PerplexityResult:
    mean_nll = total_nll / num_tokens if num_tokens else float("nan")
    return PerplexityResult(
        num_tokens=num_tokens, num_bytes=num_bytes, total_nll=total_nll, mean_nll=mean_nll,
        perplexity=perplexity(mean_nll),
        bits_per_byte=total_nll / (math.log(2) * num_bytes) if num_bytes else None, **fields)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def evaluate_perplexity(model, tokenizer, texts: Iterable[str], *, window: int | None = None,
                        stride: int | None = None, batch_size: int = 1, concatenate: bool = False,
                        prefix_token_id: int | None = None, max_documents: int | None = None,
                        progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity and bits per byte of `model` on `texts` (see the module docstring).

    window defaults to the model's max_position_embeddings, stride to window // 2. Empty documents are
    skipped and counted. The model stays on its device; inputs are moved there.
    """
    if isinstance(texts, str):
        raise ValueError("texts: expected an iterable of documents, got a single string")
    window, stride = _resolve_window(model, window, stride)
    eos_id = tokenizer.eos_token_id
    prefix_id = eos_id if prefix_token_id is None else prefix_token_id
    if prefix_id is None or (concatenate and eos_id is None):
        raise ValueError("tokenizer: has no eos_token; pass prefix_token_id")
    counts = {"documents": 0, "skipped": 0, "bytes": 0}

    def token_lists() -> Iterator[list[int]]:
        documents = islice(texts, max_documents) if max_documents is not None else iter(texts)
        while chunk := list(islice(documents, 64)):  # tokenizing a few documents at a time is much faster
            counts["documents"] += len(chunk)
            for text, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]):
                if not ids:
                    counts["skipped"] += 1
                    continue
                counts["bytes"] += len(text.encode("utf-8"))
                yield ids

    if concatenate:
        pieces = [torch.tensor([prefix_id])] + [torch.tensor(ids + [eos_id]) for ids in token_lists()]
        streams: Iterable[torch.Tensor] = [torch.cat(pieces).long()]
    else:
        streams = (torch.tensor([prefix_id] + ids, dtype=torch.long) for ids in token_lists())
    pad_id = eos_id if eos_id is not None else prefix_id
    total_nll, num_tokens = _score_streams(model, streams, window, stride, batch_size, pad_id,
                                           eos_id if concatenate else None, progress)
    return _result(total_nll, num_tokens, counts["bytes"], num_documents=counts["documents"],
                   skipped_documents=counts["skipped"], window=window, stride=stride,
                   mode="concatenated" if concatenate else "documents",
                   note="EOS separators are scored tokens with no bytes" if concatenate else None)


def evaluate_packed_perplexity(model, shards, *, window: int | None = None, stride: int | None = None,
                               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity over data_prep packed token shards (a folder, a shard, or a `PackedDataset`).

    Each shard's stream is scored as far as its training blocks reach (the tail after the last full block,
    `remainder_tokens`, is not), with position ids restarting after every EOS: with window == stride ==
    the shards' seq_len this is exactly the Trainer's eval_loss on the same blocks. Bits per byte needs
    the UTF-8 size of the scored text: it is used when every shard's metadata records it ("text_bytes")
    and no shard has a remainder; otherwise it is reported as unavailable, with the reason in `note`.
    """
    dataset = shards if isinstance(shards, PackedDataset) else PackedDataset(shards)
    window, stride = _resolve_window(model, window, stride)

    def shard_streams() -> Iterator[torch.Tensor]:
        first = 0
        for shard in dataset.shards:
            blocks = range(first, first + shard["num_blocks"])
            first += shard["num_blocks"]
            if blocks:
                inputs = [dataset[i]["input_ids"] for i in blocks]
                yield torch.cat(inputs + [dataset[blocks[-1]]["shift_labels"][-1:]])

    total_nll, num_tokens = _score_streams(model, shard_streams(), window, stride, batch_size, dataset.eos_id,
                                           dataset.eos_id, progress, total_tokens=len(dataset) * dataset.seq_len)
    remainder = sum(shard["remainder_tokens"] for shard in dataset.shards)
    num_bytes, notes = None, []
    if remainder:
        notes.append(f"{remainder} tokens after the last full block of a shard are not scored")
    if not all("text_bytes" in shard for shard in dataset.shards):
        notes.append("bits_per_byte unavailable: the shard metadata records no text_bytes (score documents/ for it)")
    elif remainder:
        notes.append("bits_per_byte unavailable: text_bytes also counts the unscored tokens")
    else:
        num_bytes = sum(int(shard["text_bytes"]) for shard in dataset.shards)
    note = "; ".join(notes) or None
    return _result(total_nll, num_tokens, num_bytes, num_documents=dataset.num_documents, skipped_documents=0,
                   window=window, stride=stride, mode="packed", note=note)


def evaluate_path(model, tokenizer, path: str | Path, *, text_field: str = "text", **options: Any) -> PerplexityResult:
    """`evaluate_packed_perplexity` for packed shards, else `evaluate_perplexity` on `read_documents(path)`."""
    if not Path(path).exists():
        raise ValueError(f"{path}: no such file or folder")
    if is_packed_shards(path):
        unsupported = sorted(k for k in ("concatenate", "max_documents", "prefix_token_id") if options.get(k))
        if unsupported:
            raise ValueError(f"{unsupported[0]}: not supported for packed token shards ({path})")
        packed_options = {k: v for k, v in options.items() if k in ("window", "stride", "batch_size", "progress")}
        return evaluate_packed_perplexity(model, path, **packed_options)
    return evaluate_perplexity(model, tokenizer, read_documents(path, text_field), **options)
