"""Pretraining objectives over packed token blocks: what the model reads and which tokens the loss scores.

    objective  model                         reads                                      scores
    clm        EmberForCausalLM              the block                                  every next token
    prefix_lm  EmberForCausalLM              the block; the first part of each document the next tokens of each
                                             is a bidirectional prefix                  document's suffix
    mlm        EmberForMaskedLM              the block with `mask_rate` of its tokens   the masked tokens
               (is_causal=False)             selected: 80% <|mask|>, 10% random, 10% kept
    ul2        EmberForCausalLM              [denoiser token] + the block with spans    the targets (sentinel +
                                             replaced by sentinels, bidirectionally;    span, for each span)
                                             then the targets, causally

FIM stays a data option (`pack.fim_rate`): it rearranges documents before packing and trains as `clm`.

Each objective is a collator over `data_prep.token_dataset.PackedDataset` examples ({"input_ids",
"shift_labels"[, "position_ids"]}); `build_collator` picks it. Unscored positions carry the label -100, so
the Trainer's `num_items_in_batch` (counted from `shift_labels`, or from `labels` for the masked LM) is the
number of scored tokens and the loss stays exact under gradient accumulation.

Documents. The masked LM and the prefix LM keep packed documents apart: the encoder reads document
boundaries from `position_ids` (keep `position_ids: true`), the prefix LM gives each document of a row its
own prefix block. UL2 follows T5's span corruption, which noises fixed-length chunks of concatenated
documents: a row is one example and its documents see each other.

Randomness comes from torch's global generator unless a `torch.Generator` is passed: the Trainer saves and
restores that generator with each checkpoint, so with `dataloader_num_workers: 0` a resumed run draws the
same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_prep.tokenizer import DENOISER_TOKENS, sentinel_token_ids
from modeling import IGNORE_INDEX
from training.arguments import OBJECTIVES, ObjectiveArguments
from training.trainer import collate_packed


def _rand(shape, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------------------------


def word_start_table(tokenizer) -> torch.Tensor:
    """For every id, whether the token can begin a word (a continuation piece cannot).

    Byte-level BPE: a piece continues a word when its text starts with a letter or digit (a word start
    carries its leading space or punctuation); Metaspace (Unigram) marks word starts with "▁", byte pieces
    continue; WordPiece marks continuations with "##". Special tokens count as word starts.
    """
    backend = tokenizer.backend_tokenizer
    kind = type(backend.model).__name__
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    starts = torch.ones(len(tokenizer), dtype=torch.bool)
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if kind == "WordPiece":
            starts[token_id] = not piece.startswith(backend.model.continuing_subword_prefix)
        elif kind == "Unigram":
            starts[token_id] = piece.startswith("▁")
        else:
            text = tokenizer.convert_tokens_to_string([piece])
            starts[token_id] = not text[:1].isalnum()
    return starts


class MaskedLMCollator:
    """Batches packed blocks for `EmberForMaskedLM`: BERT's masking (Devlin et al. 2019) on each block.

    `mask_rate` of the tokens (special tokens never) are selected; the labels hold the original token there
    and -100 elsewhere. Of the selected, `mask_token_rate` become the mask token, `random_token_rate` a
    random non-special token, the rest stay as they are. With `whole_word_mask` the selection draws words
    (`word_start_table`) with probability `mask_rate` and takes all their tokens. `position_ids` pass
    through, so the encoder keeps the packed documents apart.

    transformers' `DataCollatorForLanguageModeling` draws the same 80/10/10 split, but its whole-word
    option needs character offsets that packed token blocks no longer have, and it turns random
    replacement off for whole words; this collator works from the ids alone.
    """

    def __init__(self, tokenizer, mask_rate: float = 0.15, mask_token_rate: float = 0.8,
                 random_token_rate: float = 0.1, whole_word_mask: bool = False,
                 generator: torch.Generator | None = None):
        if tokenizer.mask_token_id is None:
            raise ValueError("tokenizer.mask_token: the tokenizer has no mask token, which objective 'mlm' needs "
                             "(train it with tokenizer.mask_token: true)")
        self.mask_id = tokenizer.mask_token_id
        self.mask_rate, self.mask_token_rate, self.random_token_rate = mask_rate, mask_token_rate, random_token_rate
        self.whole_word_mask = whole_word_mask
        self.generator = generator
        self.special = torch.zeros(len(tokenizer), dtype=torch.bool)
        self.special[tokenizer.all_special_ids] = True
        self.replacements = (~self.special).nonzero().squeeze(1)
        self.word_start = word_start_table(tokenizer) if whole_word_mask else None

    def select(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Which positions get a label."""
        special = self.special[input_ids]
        if not self.whole_word_mask:
            return (_rand(input_ids.shape, self.generator) < self.mask_rate) & ~special
        starts = self.word_start[input_ids] | special
        starts[:, 1:] |= special[:, :-1]  # a special token ends the word before it
        starts[:, 0] = True
        word = starts.long().cumsum(dim=1) - 1  # word index of each token within its row
        chosen = _rand(input_ids.shape, self.generator) < self.mask_rate  # one draw per word index
        return chosen.gather(1, word) & ~special

    def mask_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for a (batch, seq_len) tensor of ids."""
        selected = self.select(input_ids)
        labels = torch.where(selected, input_ids, IGNORE_INDEX)
        action = _rand(input_ids.shape, self.generator)
        to_mask = selected & (action < self.mask_token_rate)
        to_random = selected & ~to_mask & (action < self.mask_token_rate + self.random_token_rate)
        inputs = input_ids.masked_fill(to_mask, self.mask_id)
        picks = torch.randint(len(self.replacements), (int(to_random.sum()),), generator=self.generator)
        inputs[to_random] = self.replacements[picks]
        return inputs, labels

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([example["input_ids"] for example in examples])
        inputs, labels = self.mask_tokens(input_ids)
        batch = {"input_ids": inputs, "labels": labels}
        if "position_ids" in examples[0]:
            batch["position_ids"] = torch.stack([example["position_ids"] for example in examples])
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Prefix LM
# ---------------------------------------------------------------------------------------------------------------


def document_index(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document number within the row, position within the document) of every token of a 1D row.

    A document starts at the row's start and after every EOS, as the packer lays them out.
    """
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[0] = True
    starts[1:] = input_ids[:-1] == eos_id
    document = starts.long().cumsum(0) - 1
    first = torch.nonzero(starts).squeeze(1)
    return document, torch.arange(len(input_ids)) - first[document]


class PrefixLMCollator:
    """Batches packed blocks for a prefix LM (Raffel et al. 2020; the decoder-only form of Wang et al. 2022).

    Each document of a row splits into a prefix, which attends bidirectionally within itself
    (`block_sequence_ids` = the document's number), and a suffix, read causally; the loss scores only
    the suffix tokens, so nothing is predicted that the prefix could see. The split is a fraction of the
    document drawn uniformly from [min_fraction, max_fraction], or a fixed `prefix_tokens`; a prefix
    always leaves at least one token to predict. A document cut off by the block's end is split by its
    visible part; a one-token document is all suffix.
    """

    def __init__(self, tokenizer, min_fraction: float = 0.25, max_fraction: float = 0.75, prefix_tokens: int = 0,
                 generator: torch.Generator | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token; the prefix LM finds documents by it")
        self.eos_id = tokenizer.eos_token_id
        self.min_fraction, self.max_fraction, self.prefix_tokens = min_fraction, max_fraction, prefix_tokens
        self.generator = generator

    def prefix_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.prefix_tokens:
            wanted = torch.full_like(lengths, self.prefix_tokens)
        else:
            spread = self.max_fraction - self.min_fraction
            fraction = self.min_fraction + spread * _rand(lengths.shape, self.generator)
            wanted = (fraction * lengths).round().long().clamp(min=1)
        return torch.minimum(wanted, lengths - 1)  # one-token documents get no prefix

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate_packed(examples)
        blocks = torch.full_like(batch["input_ids"], -1)
        for row, input_ids in enumerate(batch["input_ids"]):
            document, position = document_index(input_ids, self.eos_id)
            prefix = position < self.prefix_lengths(torch.bincount(document))[document]
            blocks[row] = torch.where(prefix, document, -1)
            # Position t predicts token t+1: scored when t+1 is a suffix token. Past the block's end the next
            # token continues the last document unless this one is an EOS.
            next_in_prefix = torch.cat([prefix[1:], (input_ids[-1:] == self.eos_id)])
            batch["shift_labels"][row, next_in_prefix] = IGNORE_INDEX
        batch["labels"] = batch["shift_labels"].clone()
        batch["block_sequence_ids"] = blocks
        return batch


# ---------------------------------------------------------------------------------------------------------------
# UL2 mixture of denoisers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: "r" / "x" corrupt `rate` of the tokens in spans of mean length `mean_span`;
    "s" is a prefix LM whose suffix is `rate` of the sequence."""

    mode: str
    rate: float
    mean_span: int = 0


# UL2's mixture (Tay et al. 2022): two regular, four extreme and one sequential denoiser; drawn with equal odds.
UL2_MIXTURE = (
    Denoiser("r", 0.15, 3), Denoiser("r", 0.15, 8),
    Denoiser("x", 0.5, 3), Denoiser("x", 0.5, 8), Denoiser("x", 0.15, 64), Denoiser("x", 0.5, 64),
    Denoiser("s", 0.25),
)


def span_counts(length: int, denoiser: Denoiser) -> tuple[int, int]:
    """(noise tokens, spans) for a sequence of `length` tokens: T5's rounding, at least one of each."""
    noise = min(max(1, round(length * denoiser.rate)), length - 1)
    spans = max(1, min(round(noise / denoiser.mean_span), noise, length - noise))
    return noise, spans


def random_partition(total: int, parts: int, generator: torch.Generator | None) -> torch.Tensor:
    """`total` split into `parts` positive lengths, uniformly over all such splits."""
    cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return edges.diff()


class UL2Collator:
    """Batches packed blocks for UL2's mixture of denoisers in a decoder (a prefix LM over inputs + targets).

    Each row draws a denoiser. R and X (span corruption, Raffel et al. 2020): the longest leading part of the
    block that fits is cut into alternating kept and noise spans (random lengths, T5's layout); the inputs
    are the kept spans with sentinel i in place of noise span i, the targets sentinel i then span i, for
    each span. S: the block splits into a prefix and a suffix of `rate` of it. The row is

        [denoiser token] inputs | targets | padding

    with the first part one bidirectional block and the targets scored. Sentinels and denoiser tokens are
    those `data_prep.tokenizer` reserves (`tokenizer.num_sentinel_tokens`).
    """

    def __init__(self, tokenizer, seq_len: int, mixture: tuple[Denoiser, ...] = UL2_MIXTURE,
                 generator: torch.Generator | None = None):
        vocab = tokenizer.get_vocab()
        self.sentinels = sentinel_token_ids(tokenizer)
        self.mode_ids = {mode: vocab.get(token) for mode, token in DENOISER_TOKENS.items()}
        # Source length per denoiser: all but the denoiser token for S, the longest that fits for R and X.
        fits = {d: self.fit(seq_len, d) for d in mixture if d.mode != "s"}
        self.source_lengths = {d: fits[d][0] if d in fits else seq_len - 1 for d in mixture}
        needed = max((spans for _, _, spans in fits.values()), default=0)
        if None in self.mode_ids.values() or len(self.sentinels) < needed:
            raise ValueError(f"tokenizer.num_sentinel_tokens: objective 'ul2' at seq_len {seq_len} needs the denoiser "
                             f"tokens and {needed} sentinels, the tokenizer has {len(self.sentinels)} (train it "
                             f"with tokenizer.num_sentinel_tokens: {needed})")
        self.seq_len, self.mixture, self.generator = seq_len, mixture, generator
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @staticmethod
    def fit(seq_len: int, denoiser: Denoiser) -> tuple[int, int, int]:
        """(source length, noise tokens, spans) of the longest source whose example fits in `seq_len`:
        1 denoiser token + source + 2 sentinels per span."""
        length = seq_len - 1
        while length > 2:
            noise, spans = span_counts(length, denoiser)
            if length + 2 * spans <= seq_len - 1:
                return length, noise, spans
            length -= 1
        raise ValueError(f"seq_len: {seq_len} tokens are too few for a UL2 example")

    def corrupt(self, source: torch.Tensor, denoiser: Denoiser) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for one source."""
        if denoiser.mode == "s":
            split = len(source) - max(1, round(denoiser.rate * len(source)))
            return source[:split], source[split:]
        noise, spans = span_counts(len(source), denoiser)
        kept = random_partition(len(source) - noise, spans, self.generator)
        noised = random_partition(noise, spans, self.generator)
        inputs, targets, start = [], [], 0
        for i, (keep, drop) in enumerate(zip(kept.tolist(), noised.tolist())):
            sentinel = source.new_tensor([self.sentinels[i]])
            inputs += [source[start : start + keep], sentinel]
            targets += [sentinel, source[start + keep : start + keep + drop]]
            start += keep + drop
        return torch.cat(inputs), torch.cat(targets)

    def example(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        draw = int(torch.randint(len(self.mixture), (1,), generator=self.generator))
        denoiser = self.mixture[draw]
        inputs, targets = self.corrupt(block[: self.source_lengths[denoiser]], denoiser)
        prefix = torch.cat([block.new_tensor([self.mode_ids[denoiser.mode]]), inputs])
        sequence = torch.cat([prefix, targets])
        used = len(sequence)
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[:used] = sequence
        shift_labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        shift_labels[len(prefix) - 1 : used - 1] = targets  # the last input predicts the first target
        blocks = torch.full((self.seq_len,), -1, dtype=torch.long)
        blocks[: len(prefix)] = 0
        return {"input_ids": input_ids, "shift_labels": shift_labels, "block_sequence_ids": blocks}

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = [self.example(example["input_ids"]) for example in examples]
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        batch["labels"] = batch["shift_labels"].clone()
        return batch


def build_collator(args: ObjectiveArguments, tokenizer, seq_len: int,
                   generator: torch.Generator | None = None) -> Any:
    """The collator of `args.objective` for blocks of `seq_len` tokens (checks `args` first)."""
    args.check(seq_len)
    if args.objective == "mlm":
        return MaskedLMCollator(tokenizer, args.mask_rate, args.mask_token_rate, args.random_token_rate,
                                args.whole_word_mask, generator)
    if args.objective == "prefix_lm":
        return PrefixLMCollator(tokenizer, args.prefix_min_fraction, args.prefix_max_fraction, args.prefix_tokens,
                                generator)
    if args.objective == "ul2":
        return UL2Collator(tokenizer, seq_len, generator=generator)
    return collate_packed


__all__ = [
    "OBJECTIVES",
    "UL2_MIXTURE",
    "Denoiser",
    "MaskedLMCollator",
    "PrefixLMCollator",
    "UL2Collator",
    "build_collator",
    "document_index",
    "word_start_table",
]
