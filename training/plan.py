"""The run plan: how many tokens each step of a pretraining run trains and how many steps it takes, worked out
once from the arguments and the data, and read by everything else (the Trainer's batch ramp and logs, the
throughput meter, the reports, the quickstart's plan). The one place that multiplies batch size, ranks and
sequence length.

Under tensor parallelism the ranks of one group read the same rows, so the data-parallel degree, not the number
of ranks, counts the rows of a step: `world_size / tp_size`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from cli import ConfigError
from modeling import EmberConfig, EmberForCausalLM
from training.arguments import OptimizerArguments, PretrainingArguments
from training.data_order import BatchRamp
from training.muon import muon_optimizer

# Timed probe steps, the median taken: a few seconds on 2 cores. On a shared VM the probe still moves with the
# machine (0.27-0.36 s per micro step in three probes in a row, benchmarks/results/quickstart_cpu.md).
PROBE_STEPS = 8


@dataclass(frozen=True)
class RunPlan:
    """seq_len: tokens per row; micro_batch_size: rows per rank per micro-batch; accumulation: micro-batches of a
    full step; data_parallel: ranks reading different rows; max_steps: optimizer steps of the run;
    step_micro_batches: with a batch ramp, each step's micro-batches (else every step has `accumulation`)."""

    seq_len: int
    micro_batch_size: int
    accumulation: int
    data_parallel: int
    max_steps: int
    step_micro_batches: tuple[int, ...] | None = None

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens of one micro-batch slot across the data-parallel ranks."""
        return self.micro_batch_size * self.data_parallel * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full step (after the batch ramp, if any)."""
        return self.micro_batch_tokens * self.accumulation

    @property
    def global_batch_size(self) -> int:
        """Rows of a full step."""
        return self.tokens_per_step // self.seq_len

    def step_tokens(self, step: int) -> int:
        """Tokens of optimizer step `step` (counted from 1; past the end, a full step)."""
        if self.step_micro_batches is None:
            return self.tokens_per_step
        return self.micro_batch_tokens * self.step_micro_batches[min(max(step, 1), len(self.step_micro_batches)) - 1]

    def tokens_after(self, steps: int) -> int:
        """Tokens trained by the end of step `steps`."""
        if self.step_micro_batches is None:
            return self.tokens_per_step * steps
        return self.micro_batch_tokens * sum(self.step_micro_batches[:steps])

    @property
    def total_tokens(self) -> int:
        return self.tokens_after(self.max_steps)


def plan_run(args: TrainingArguments, run_args: PretrainingArguments, seq_len: int, *, tp_size: int = 1,
             streaming: bool = False) -> RunPlan:
    """The plan of a run: `max_steps` from `args`, or from `run_args.max_tokens`, or from the batch ramp
    (`batch_size_warmup_tokens`), which sets each step's micro-batches. Impossible settings are one-line
    `ConfigError`s naming the key."""
    shape = {"seq_len": seq_len, "micro_batch_size": args.per_device_train_batch_size,
             "accumulation": args.gradient_accumulation_steps, "data_parallel": args.world_size // tp_size}
    max_steps, ramp = args.max_steps, None
    if run_args.batch_size_warmup_tokens:
        ramp = tuple(_ramp(run_args, RunPlan(**shape, max_steps=max_steps)))
        max_steps = len(ramp)
    elif run_args.max_tokens:
        max_steps = math.ceil(run_args.max_tokens / RunPlan(**shape, max_steps=0).tokens_per_step)
    if streaming and max_steps <= 0:
        raise ConfigError("max_steps: a streaming run needs max_steps (or max_tokens); a stream has no length")
    return RunPlan(**shape, max_steps=max_steps, step_micro_batches=ramp)


def _ramp(run_args: PretrainingArguments, full: RunPlan) -> list[int]:
    """Micro-batches of each step under `batch_size_warmup_tokens`, for `full.max_steps` steps or `max_tokens`."""
    if full.accumulation < 2:
        raise ConfigError("batch_size_warmup_tokens: the batch grows by gradient accumulation; set "
                          "gradient_accumulation_steps to the full batch's micro-batches (2 or more)")
    ramp = BatchRamp(full.micro_batch_tokens, full.accumulation, int(run_args.batch_size_warmup_start_tokens),
                     int(run_args.batch_size_warmup_tokens))
    if run_args.batch_size_warmup_start_tokens > ramp.full_tokens:
        raise ConfigError(f"batch_size_warmup_start_tokens: {run_args.batch_size_warmup_start_tokens:,.0f} tokens is "
                          f"more than the full batch ({ramp.full_tokens:,} tokens per step)")
    steps = (ramp.schedule(max_tokens=int(run_args.max_tokens)) if run_args.max_tokens
             else ramp.schedule(max_steps=full.max_steps))
    total = full.micro_batch_tokens * sum(steps)
    if run_args.batch_size_warmup_tokens >= total:
        raise ConfigError(f"batch_size_warmup_tokens: {run_args.batch_size_warmup_tokens:,.0f} tokens is not shorter "
                          f"than the run ({total:,} tokens)")
    return steps


def probe_step_seconds(config: EmberConfig, batch_size: int, seq_len: int, optimizer: OptimizerArguments | None = None,
                       steps: int = PROBE_STEPS) -> float:
    """Seconds one pretraining step of a model of `config` takes here: forward with per-document positions (each
    row holds two documents, so attention takes the masked path packed blocks take), backward, clipping and the
    run's optimizer (Muon with its Newton-Schulz iterations, or AdamW), on random tokens. The median of `steps`
    timed steps after one untimed warm-up step."""
    torch.manual_seed(0)
    model = EmberForCausalLM._from_config(config, attn_implementation="sdpa").train()
    if optimizer is not None and optimizer.optimizer == "muon":
        matrices = {name for name, p in model.named_parameters() if p.ndim == 2}
        step = muon_optimizer(model, optimizer, matrices, lr=1e-4, weight_decay=0.1)
    else:
        step = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    half = seq_len // 2
    positions = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).repeat(batch_size, 1)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=inputs, position_ids=positions, labels=targets, shift_labels=targets,
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step.step()
        step.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
