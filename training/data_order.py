"""Which blocks each optimizer step trains on, when a run grows its batch or skips data after a loss spike.

- `BatchRamp`: batch-size warmup. Tokens per step grow linearly (in tokens trained) from a start value to the
  full batch, as GPT-3 did (Brown et al. 2020: 32 K to 3.2 M tokens over the first 4-12 B tokens), by
  taking fewer gradient-accumulation micro-batches per step early on. `schedule` gives each step's count
  of micro-batches and keeps a `max_tokens` budget exact.
- `StepBatchSampler`: the batches of packed blocks for every micro-batch slot of every step of the run, in the
  order the Trainer reads them, with the ramp's empty slots and without skipped blocks.

A step always has `gradient_accumulation_steps` slots; during the ramp its first slots are empty batches
(no forward, no backward; `PretrainingTrainer.training_step` passes over them), so the Trainer's own step
accounting, gradient synchronisation (the last slot of a step is always a real batch) and resume arithmetic
(skip `global_step x accumulation` batches) stay as they are. The blocks form an endless sequence: pass after
pass over the shards, each pass in a seeded permutation (or in order), with the skipped blocks taken out of
every pass. Removing blocks that were read after a checkpoint leaves every position before that checkpoint
unchanged, so a rollback resumes exactly there and goes on with the blocks after the skipped ones, and a
later resume from a checkpoint that records the skipped blocks rebuilds the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchRamp:
    """Micro-batches per optimizer step while the batch grows.

    micro_tokens: tokens one micro-batch slot trains across all ranks (per-device batch x ranks x seq_len).
    accumulation: micro-batches per step at the full batch (`gradient_accumulation_steps`).
    start_tokens: tokens per step at the start (rounded down to whole micro-batches, at least one).
    warmup_tokens: tokens trained by the time the batch is full (0: no ramp).
    """

    micro_tokens: int
    accumulation: int
    start_tokens: int = 0
    warmup_tokens: int = 0

    @property
    def full_tokens(self) -> int:
        return self.micro_tokens * self.accumulation

    def micro_batches(self, tokens_done: int) -> int:
        """Micro-batches of the step that starts after `tokens_done` tokens: linear in tokens, whole micro-batches."""
        if not self.warmup_tokens or tokens_done >= self.warmup_tokens:
            return self.accumulation
        start = min(self.accumulation, max(1, self.start_tokens // self.micro_tokens))
        target = self.start_tokens + (self.full_tokens - self.start_tokens) * tokens_done / self.warmup_tokens
        return min(self.accumulation, max(start, int(target // self.micro_tokens)))

    def schedule(self, max_steps: int | None = None, max_tokens: int | None = None) -> list[int]:
        """Micro-batches of each step: `max_steps` steps, or as many steps as train exactly `max_tokens` tokens
        (rounded up to whole micro-batches; the last step takes only what is left)."""
        steps: list[int] = []
        done = 0
        if max_tokens is not None:
            budget = math.ceil(max_tokens / self.micro_tokens)  # in micro-batches
            while done < budget:
                steps.append(min(self.micro_batches(done * self.micro_tokens), budget - done))
                done += steps[-1]
            return steps
        for _ in range(max_steps or 0):
            steps.append(self.micro_batches(done * self.micro_tokens))
            done += steps[-1]
        return steps


def block_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted block indices as [first, last + 1) ranges: [3, 4, 5, 9] -> [[3, 6], [9, 10]]."""
    ranges: list[list[int]] = []
    for block in sorted(set(blocks)):
        if ranges and ranges[-1][1] == block:
            ranges[-1][1] += 1
        else:
            ranges.append([block, block + 1])
    return ranges


def blocks_of_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    return {block for start, end in ranges for block in range(start, end)}


class StepBatchSampler:
    """A batch sampler over `num_blocks` blocks that yields, for each step of `steps` (micro-batches per step),
    `accumulation x world_size` batches: slot by slot, rank by rank (accelerate hands batch k to rank
    k % world_size). The first `accumulation - steps[t]` slots of step t are empty lists; the others hold
    `batch_size` block indices each, the next ones of the block sequence.

    seed: pass e of the shards is `torch.randperm(num_blocks)` seeded with seed + e (shuffle), or in order.
    skipped: block indices never yielded.
    """

    drop_last = True  # tells accelerate's BatchSamplerShard that every batch is complete as it is

    def __init__(self, num_blocks: int, batch_size: int, world_size: int, accumulation: int, steps: list[int],
                 seed: int, shuffle: bool = True, skipped: Iterable[int] = ()):
        self.num_blocks, self.batch_size, self.world_size = num_blocks, batch_size, world_size
        self.accumulation, self.steps, self.seed, self.shuffle = accumulation, list(steps), seed, shuffle
        self.skipped = set(skipped)
        if any(not 1 <= count <= accumulation for count in self.steps):
            raise ValueError(f"steps: each step takes 1 to {accumulation} micro-batches")
        self.available = num_blocks - len(self.skipped & set(range(num_blocks)))
        if self.available <= 0:
            raise ValueError("skipped: every block of the training data is skipped")

    def __len__(self) -> int:
        return len(self.steps) * self.accumulation * self.world_size

    def blocks(self) -> Iterator[int]:
        """The endless block sequence: pass after pass, skipped blocks left out."""
        epoch = 0
        while True:
            if self.shuffle:
                order = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed + epoch))
                order = order.tolist()
            else:
                order = range(self.num_blocks)
            yield from (block for block in order if block not in self.skipped)
            epoch += 1

    def __iter__(self) -> Iterator[list[int]]:
        blocks = self.blocks()
        for count in self.steps:
            for slot in range(self.accumulation):
                real = slot >= self.accumulation - count
                for _ in range(self.world_size):
                    yield [next(blocks) for _ in range(self.batch_size)] if real else []

    def blocks_through(self, step: int) -> int:
        """Blocks trained on by the end of step `step` (1-based)."""
        return sum(self.steps[:step]) * self.world_size * self.batch_size

    def blocks_of_steps(self, first: int, last: int) -> list[int]:
        """The block indices steps `first` to `last` (1-based, inclusive) train on."""
        start, end = self.blocks_through(first - 1), self.blocks_through(last)
        blocks = self.blocks()
        for _ in range(start):
            next(blocks)
        return [next(blocks) for _ in range(end - start)]

    def epoch_at(self, step: int) -> float:
        """Passes over the (not skipped) blocks made by the end of step `step`."""
        return self.blocks_through(step) / self.available
