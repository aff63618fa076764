"""The planner, `modeling.sizing`, against real pretraining steps on this CPU: step time and peak memory.

What it measures
----------------
Three models (the `nano` preset, a 28 M-parameter shape, the `125m` preset) each run pretraining steps as
`recipes/pretrain.py` runs them: a batch of packed blocks through `collate_packed` (input_ids, labels,
shift_labels and per-document position_ids), forward with `use_cache=False`, backward, gradient clipping at
1.0, then fused AdamW (the Trainer's default optimizer since torch 2.8) over the recipe's weight-decay split,
all in fp32 with the recipes' attention (`--attn`, default sdpa), and `zero_grad(set_to_none=True)`. Models
are built by `training.pretraining.build_model`, so the vocabulary is the tokenizer's, as in the recipe (the
125m preset's 32000 becomes the data's 8192; 32000 would only add unused rows).

* Time: after `--warmup` untimed steps of each model, `--steps` rounds time one step of every model each
  (`time.perf_counter`, with the process's CPU time beside it), the order rotating every round so that
  other work on the machine falls on all models alike. Other work only ever adds time, so each model's
  fastest step stands for the machine's own speed (as Python's timeit reasons); medians and quartiles are
  recorded too. The machine is calibrated once, on the first model (nano): `--split_steps` profiled steps
  divide its time between the kernels that do the FLOPs `sizing` counts (matmuls, the fused attention)
  and the rest (elementwise work, loss, optimizer). The first part of its fastest step over
  `sizing.training_flops` gives the achieved FLOP/s, the second over the bytes of activations it stores
  for backward (`sizing.memory_per_gpu`'s "activations") the rate of the memory-bound work. The other
  models' step times are then predicted by `sizing.training_time` with both rates and compared with their
  fastest steps; the FLOPs-only prediction (the whole nano step at one FLOP rate, sizing's time model
  before the memory-bound term) is reported beside it.
* Memory: one more step runs under `torch.profiler` with `profile_memory=True`, which reports every
  allocation and free of torch's CPU allocator with its address and size. Summing them in order gives the
  bytes alive at each moment of the step; its maximum plus the tensors alive before the step (weights,
  buffers, AdamW's moments, each storage counted once) is the peak of torch's own allocations, the CPU
  counterpart of `torch.cuda.max_memory_allocated`. Process RSS would add the interpreter, libraries and
  allocator caching; a saved-tensor hook would miss the transient tensors (gradients, the loss's
  b x s x V buffers) that set the peak. The profiled batch is the first one with a document boundary, so
  SDPA gets a mask, the recipes' usual case. It is compared with `sizing.memory_per_gpu` for the same run:
  one process, fp32 (`param_bytes=4`), the micro-batch and seq_len, fused attention unless `--attn eager`,
  the mask, and gradients freed between steps (`gradients_persist=False`).

Targets: predicted step time and peak memory each within `--tolerance` (25%) of the measurement.

`--recipe_check` instead runs `recipes/pretrain.py` itself with the 125m preset on the token data
(`recipes/configs/pretrain_nano_cpu.yaml` plus `--preset=125m` and a short schedule): an uninterrupted run of
`--recipe_steps` steps that saves a checkpoint every `--recipe_save_steps`, then a second run that starts
from a copy of its first checkpoint with `--resume_from_checkpoint=auto`. It checks that the second run
resumed (trained only the steps after the checkpoint), that both logged the same loss, gradient norm and
learning rate at every step and ended with bitwise equal weights, and that each wrote its run report.

How to run
----------
    # the token data: the stdlib pipeline, 600 documents (seq_len 512, vocab 8192; about a minute)
    .venv/bin/python -m data_prep run --config recipes/configs/data/stdlib.yaml \\
        --output_dir=outputs/sizing_data --sources.0.max_docs=600 --workers=1
    .venv/bin/python benchmarks/bench_sizing_cpu.py --data_dir outputs/sizing_data
    .venv/bin/python benchmarks/bench_sizing_cpu.py --data_dir outputs/sizing_data --recipe_check

Without `--data_dir` the models train on random tokens (`--seq_len`, `--vocab_size`). A table is printed and
the record (machine, command, load average before and after, every step time, predictions, errors) is written
as JSON to `--output` (default `benchmarks/results/sizing_cpu.json`, or `sizing_recipe_check_cpu.json`).
CPU timings follow whatever else runs on the machine: compare them only from runs on an idle one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_common import available_cores, cpu_model_name, quartiles, save_record
from torch.profiler import ProfilerActivity, profile

from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint
from modeling import EmberConfig, EmberForCausalLM, sizing
from training.arguments import ModelArguments
from training.optim import decay_parameter_names
from training.pretraining import build_model
from training.trainer import collate_packed

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
RECIPE_CONFIG = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
# The CPU kernels that do the FLOPs sizing counts (6N's matmuls, the attention's QK^T and AV); eager attention
# runs its matmuls as bmm. Everything else in a step is memory-bound.
COMPUTE_KERNELS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})
# What an exact resume must reproduce at every logged step (timings and throughput differ between runs).
COMPARED = ("step", "epoch", "loss", "grad_norm", "learning_rate")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    preset: str
    overrides: dict = field(default_factory=dict)
    batch_size: int = 1


# nano's width x 2, depth + 2, head_dim 64: the LLaMA proportions (SwiGLU at 2.75 h, GQA 2:1) at 28 M.
MODELS = (
    ModelSpec("nano", "nano", {}, 4),
    ModelSpec("28m", "nano", {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8}, 2),
    ModelSpec("125m", "125m", {}, 2),
)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="a data_prep output (tokenizer/, tokens/train); default: random tokens")
    parser.add_argument("--models", default=",".join(m.name for m in MODELS),
                        help="comma-separated, from " + ", ".join(m.name for m in MODELS) + "; the first calibrates")
    parser.add_argument("--batch_sizes", default=None,
                        help="micro-batch per model, e.g. nano=4,28m=2 (default: " +
                             ", ".join(f"{m.name}={m.batch_size}" for m in MODELS) + ")")
    parser.add_argument("--model_overrides", default="{}",
                        help="JSON object of EmberConfig fields applied to every model (tests use tiny shapes)")
    parser.add_argument("--seq_len", type=int, default=512, help="random tokens only; shards bring their own")
    parser.add_argument("--vocab_size", type=int, default=8192, help="random tokens only")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (the recipes' default: sdpa)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (rounds)")
    parser.add_argument("--split_steps", type=int, default=3,
                        help="profiled steps that split the calibration model's time into FLOP kernels and the rest")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--tolerance", type=float, default=0.25, help="target: |predicted / measured - 1|")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe_check", action="store_true",
                        help="run the 125m checkpoint/resume check of recipes/pretrain.py instead")
    parser.add_argument("--recipe_preset", default="125m")
    parser.add_argument("--recipe_model_overrides", default="{}", help="JSON, for the recipe check")
    parser.add_argument("--recipe_steps", type=int, default=4)
    parser.add_argument("--recipe_save_steps", type=int, default=2)
    parser.add_argument("--recipe_batch_size", type=int, default=1)
    parser.add_argument("--recipe_output_dir", type=Path, default=REPO_ROOT / "outputs" / "sizing_recipe_check")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/sizing_cpu.json or sizing_recipe_check_cpu.json)")
    args = parser.parse_args(argv)
    if min(args.steps, args.split_steps, args.threads, args.seq_len, args.vocab_size) < 1 or args.warmup < 0:
        parser.error("--steps, --split_steps, --threads, --seq_len and --vocab_size must be >= 1, --warmup >= 0")
    if not 0 < args.recipe_save_steps < args.recipe_steps:
        parser.error("--recipe_save_steps must be between 0 and --recipe_steps")
    known = {m.name: m for m in MODELS}
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    if not names or any(name not in known for name in names):
        parser.error(f"--models: choose from {', '.join(known)}")
    batch_sizes = {m.name: m.batch_size for m in MODELS}
    for item in filter(None, (args.batch_sizes or "").split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in known or not value.strip().isdigit() or int(value) < 1:
            parser.error(f"--batch_sizes: expected NAME=N with NAME in {', '.join(known)}, got {item!r}")
        batch_sizes[name.strip()] = int(value)
    try:
        args.model_overrides = json.loads(args.model_overrides)
        args.recipe_model_overrides = json.loads(args.recipe_model_overrides)
    except json.JSONDecodeError as err:
        parser.error(f"model overrides: not valid JSON ({err})")
    args.specs = [ModelSpec(known[n].name, known[n].preset, {**known[n].overrides, **args.model_overrides},
                            batch_sizes[n]) for n in names]
    return args


# --------------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------------


class TokenSource:
    """Consecutive batches of packed blocks: the shards of a data_prep run, or random tokens of the vocabulary."""

    def __init__(self, data_dir: Path | None, seq_len: int, vocab_size: int, seed: int):
        self.tokenizer = None
        if data_dir is not None:
            self.tokenizer = load_tokenizer(data_dir / "tokenizer")
            self.dataset = PackedDataset(data_dir / "tokens" / "train", return_position_ids=True,
                                         expected_fingerprint=tokenizer_fingerprint(self.tokenizer))
            self.seq_len = self.dataset.seq_len
            # Random blocks, as the Trainer's sampler draws them (neighbouring blocks share long documents).
            self.order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            self.dataset, self.seq_len, self.vocab_size = None, seq_len, vocab_size
            self.generator = torch.Generator().manual_seed(seed)
        self.next_block = 0

    def describe(self, data_dir: Path | None) -> str:
        return f"{data_dir} ({len(self.dataset):,} blocks)" if self.dataset is not None else "random tokens"

    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self.dataset is None:  # one document per row: plain causal attention
            ids = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=self.generator)
            return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].clone(),
                    "shift_labels": ids[:, 1:].contiguous()}
        indices = [self.order[(self.next_block + j) % len(self.order)] for j in range(batch_size)]
        self.next_block += batch_size
        return collate_packed([self.dataset[i] for i in indices])


def has_document_boundary(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a row restarts its positions: transformers then builds a (b, 1, s, s) mask for the attention."""
    positions = batch.get("position_ids")
    return positions is not None and bool((positions[:, 1:] == 0).any())


def build(spec: ModelSpec, source: TokenSource, attn: str, seed: int) -> EmberForCausalLM:
    torch.manual_seed(seed)
    if source.tokenizer is not None:  # the recipe's own builder: vocabulary and special ids from the tokenizer
        model = build_model(ModelArguments(preset=spec.preset, model_overrides=dict(spec.overrides),
                                           attn_implementation=attn), source.tokenizer, source.seq_len)
    else:
        config = EmberConfig.from_preset(spec.preset, **{"vocab_size": source.vocab_size,
                                                         "max_position_embeddings": source.seq_len, **spec.overrides})
        model = EmberForCausalLM._from_config(config, attn_implementation=attn)
        model.config.use_cache = False
    model.train()
    return model


def build_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The recipes' AdamW: betas 0.9/0.95, weight decay 0.1 on the matrices only, the fused kernel."""
    decay = set(decay_parameter_names(model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One pretraining step as the Trainer takes it (fp32, no accumulation); returns the loss."""
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight or a view counts once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def resident_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of the tensors that live across steps: weights and buffers, gradients, optimizer state."""
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": storage_bytes(list(model.parameters()) + list(model.buffers())),
            "grads": storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": storage_bytes(state)}


def allocation_peak(fn) -> dict[str, int]:
    """Run `fn()` under the profiler's memory tracking; the peak and final bytes of CPU allocations made in it.

    Only blocks allocated while `fn` runs count: frees of older blocks are matched by address and ignored,
    so the result is what `fn` added on top of what was already alive."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    live: dict[int, int] = {}
    current = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        event_args = event["args"]
        if event_args.get("Device Type", 0) != 0:  # CPU only
            continue
        address, size = event_args["Addr"], event_args["Bytes"]
        if size > 0:
            live[address] = size
            current += size
        elif address in live:
            current -= live.pop(address)
        peak = max(peak, current)
    return {"peak": peak, "end": current}


def measure_step_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Peak bytes of torch's CPU allocations over one training step, the state alive before it included."""
    gc.collect()
    before = resident_state_bytes(model, optimizer)
    step = allocation_peak(lambda: train_step(model, optimizer, {k: v.clone() for k, v in batch.items()}))
    return {**{f"resident_{key}": value for key, value in before.items()},
            "step_peak": step["peak"], "peak": sum(before.values()) + step["peak"]}


def kernel_split(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Seconds of training steps spent in the kernels that do sizing's counted FLOPs (matmuls, fused attention)
    and in everything else (elementwise work, loss, optimizer), from the profiler's per-op self times."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            train_step(model, optimizer, batch)
    split = {"compute_s": 0.0, "other_s": 0.0, "steps": len(batches)}
    for event in prof.key_averages():
        split["compute_s" if event.key in COMPUTE_KERNELS else "other_s"] += event.self_cpu_time_total / 1e6
    return split


def step_timed(run: dict[str, Any], source: TokenSource) -> None:
    """One step of `run` on the next batch: its wall seconds, and the CPU seconds of all the process's threads
    alongside (other work on the machine stretches the first more than the second)."""
    batch = source.batch(run["spec"].batch_size)
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    run["losses"].append(train_step(run["model"], run["optimizer"], batch))
    run["step_seconds"].append(time.perf_counter() - start)
    run["step_cpu_seconds"].append(time.process_time() - cpu_start)


def time_models(runs: list[dict[str, Any]], source: TokenSource, warmup: int, steps: int) -> None:
    """`warmup` untimed steps of each model, then `steps` rounds of one step each, the order rotating every
    round, so that a burst of other work on the machine falls on every model alike."""
    for run in runs:
        run.update(losses=[], step_seconds=[], step_cpu_seconds=[])
        for _ in range(warmup):
            step_timed(run, source)
        run.update(losses=[], step_seconds=[], step_cpu_seconds=[])
    for index in range(steps):
        shift = index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            step_timed(run, source)


def prepare(spec: ModelSpec, source: TokenSource, args: argparse.Namespace) -> dict[str, Any]:
    model = build(spec, source, args.attn, args.seed)
    if model.config._attn_implementation != args.attn:
        raise RuntimeError(f"asked for attn_implementation={args.attn!r}, got {model.config._attn_implementation!r}")
    return {"spec": spec, "model": model, "optimizer": build_optimizer(model)}


def finish(run: dict[str, Any], source: TokenSource, split_steps: int) -> dict[str, Any]:
    """One profiled step of a timed model, then the model's record (its config kept for the predictions)."""
    spec, model = run["spec"], run["model"]
    batch = source.batch(spec.batch_size)
    for _ in range(64):  # the recipes' usual case, documents packed in a row
        if has_document_boundary(batch):
            break
        batch = source.batch(spec.batch_size)
    memory = measure_step_memory(model, run["optimizer"], batch)
    split = kernel_split(model, run["optimizer"], [source.batch(spec.batch_size) for _ in range(split_steps)])
    config = model.config
    result = {"name": spec.name, "model_config": config, "preset": spec.preset, "overrides": spec.overrides,
              "batch_size": spec.batch_size, "seq_len": source.seq_len,
              "tokens_per_step": spec.batch_size * source.seq_len,
              "parameters": sum(p.numel() for p in model.parameters()), "config": config.to_diff_dict(),
              "attention_mask": has_document_boundary(batch), "memory": memory, "kernel_split": split,
              **{key: run[key] for key in ("step_seconds", "step_cpu_seconds", "losses")}}
    q1, median, q3 = quartiles(run["step_seconds"])
    # Other work on a shared machine only ever adds time, so the fastest step is the closest to the machine's
    # own speed (the reasoning of Python's timeit); the median and quartiles show how much was added.
    result.update(best_step_s=min(run["step_seconds"]), median_step_s=median, q1_step_s=q1, q3_step_s=q3,
                  median_step_cpu_s=quartiles(run["step_cpu_seconds"])[1],
                  step_flops=sizing.training_flops(config, result["tokens_per_step"], source.seq_len))
    run.clear()
    gc.collect()
    return result


def predict(results: list[dict[str, Any]], attn: str, packed: bool) -> dict[str, float]:
    """Fill in sizing's predictions and their errors from a calibration on the first model (nano).

    Time, `sizing.training_time`'s two terms: nano's profiled share of the step in the FLOP kernels turns its
    median step into the achieved FLOP/s of those kernels, the rest into the rate at which the memory-bound
    work streams (`sizing.memory_bound_bytes`: the stored activations and the loss's logits). The FLOPs-only
    prediction (the whole step at one FLOP rate) is kept beside it. `packed`: rows pack documents, so many
    batches give the attention a mask."""
    first = results[0]
    share = first["kernel_split"]["compute_s"] / (first["kernel_split"]["compute_s"] + first["kernel_split"]["other_s"])

    def streamed(r: dict[str, Any]) -> float:
        return sizing.memory_bound_bytes(r["model_config"], r["tokens_per_step"], r["seq_len"], param_bytes=4,
                                         flash_attention=attn != "eager", attention_mask=packed)

    calibration = {"compute_share": share, "flops_per_s": first["step_flops"] / (share * first["best_step_s"]),
                   "memory_bound_bytes_per_s": streamed(first) / ((1 - share) * first["best_step_s"]),
                   "flops_only_flops_per_s": first["step_flops"] / first["best_step_s"]}
    for r in results:
        config, tokens, seq_len = r["model_config"], r["tokens_per_step"], r["seq_len"]
        r["memory_bound_bytes"] = streamed(r)
        r["predicted_step_s"] = sizing.training_time(
            config, tokens, 1, calibration["flops_per_s"], 1.0, seq_len, calibration["memory_bound_bytes_per_s"],
            param_bytes=4, flash_attention=attn != "eager", attention_mask=packed)
        r["time_error"] = r["predicted_step_s"] / r["best_step_s"] - 1
        r["flops_only_predicted_step_s"] = sizing.training_time(config, tokens, 1,
                                                                calibration["flops_only_flops_per_s"], 1.0, seq_len)
        r["flops_only_time_error"] = r["flops_only_predicted_step_s"] / r["best_step_s"] - 1
        estimate = sizing.memory_per_gpu(config, 1, "ddp", r["batch_size"], seq_len, param_bytes=4,
                                         flash_attention=attn != "eager", attention_mask=r["attention_mask"],
                                         gradients_persist=False)
        r["predicted_memory"] = estimate
        r["memory_error"] = estimate["total"] / r["memory"]["peak"] - 1
        split = r["kernel_split"]  # per model, for the record: how each one divides its step
        r["kernel_split"]["compute_share"] = split["compute_s"] / (split["compute_s"] + split["other_s"])
    first["calibration"] = True
    return calibration


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
            "cpus_available": available_cores(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": threads}


def format_table(results: list[dict[str, Any]], tolerance: float) -> str:
    header = (f"{'model':<6} {'params':>7} {'batch':>7} {'GFLOP':>6} {'act MiB':>7} {'median s (IQR)':>19} "
              f"{'best s':>6} {'pred s':>6} {'err':>7} {'FLOPs-only':>10} {'peak MiB':>8} {'pred MiB':>8} {'err':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        iqr = f"{r['median_step_s']:.2f} ({r['q1_step_s']:.2f}-{r['q3_step_s']:.2f})"
        best = f"{r['best_step_s']:.2f}"
        time_error, flops_only = (("calib.", "calib.") if r.get("calibration") else
                                  (f"{100 * r['time_error']:+.1f}%", f"{100 * r['flops_only_time_error']:+.1f}%"))
        lines.append(
            f"{r['name']:<6} {r['parameters'] / 1e6:6.1f}M {r['batch_size']:>3}x{r['seq_len']:<3} "
            f"{r['step_flops'] / 1e9:6.0f} {r['memory_bound_bytes'] / 2**20:7.0f} {iqr:>19} {best:>6} "
            f"{r['predicted_step_s']:6.2f} {time_error:>7} {flops_only:>10} "
            f"{r['memory']['peak'] / 2**20:8.0f} {r['predicted_memory']['total'] / 2**20:8.0f} "
            f"{100 * r['memory_error']:+5.1f}%")
    worst = worst_error(results)
    lines.append(f"target: time and memory within {100 * tolerance:.0f}% -> "
                 f"{'met' if worst <= tolerance else 'MISSED'} (largest error {100 * worst:.1f}%)")
    return "\n".join(lines)


def worst_error(results: list[dict[str, Any]]) -> float:
    return max([abs(r["time_error"]) for r in results[1:]] + [abs(r["memory_error"]) for r in results])


def run_measurements(args: argparse.Namespace, argv: list[str] | None) -> int:
    source = TokenSource(args.data_dir, args.seq_len, args.vocab_size, args.seed)
    info = machine_info(args.threads)
    print(f"machine: {info['cpu_model']} | {info['cpus_available']} cores | torch {info['torch']} "
          f"({args.threads} threads) | transformers {info['transformers']}")
    print(f"data:    {source.describe(args.data_dir)} | seq_len {source.seq_len} | fp32, {args.attn}, fused AdamW | "
          f"{args.warmup} warm-up + {args.steps} timed steps (interleaved), then 1 profiled step per model")
    load_before = os.getloadavg()
    runs = [prepare(spec, source, args) for spec in args.specs]
    time_models(runs, source, args.warmup, args.steps)
    results = []
    for index, run in enumerate(runs):  # the calibration model's split over several steps, the others' for the record
        result = finish(run, source, args.split_steps if index == 0 else 1)
        results.append(result)
        print(f"  {result['name']:<6} {result['parameters'] / 1e6:.1f}M params, "
              f"{result['batch_size']}x{source.seq_len}: best {result['best_step_s']:.2f} s/step, median "
              f"{result['median_step_s']:.2f} "
              f"({result['median_step_cpu_s']:.2f} CPU s), "
              f"peak {result['memory']['peak'] / 2**20:.0f} MiB (mask: {result['attention_mask']})", flush=True)
    load_after = os.getloadavg()
    calibration = predict(results, args.attn, packed=source.dataset is not None)
    print()
    print(f"calibrated on {results[0]['name']}: matmul and attention kernels {100 * calibration['compute_share']:.0f}% "
          f"of its step -> {calibration['flops_per_s'] / 1e9:.1f} GFLOP/s; the rest -> "
          f"{calibration['memory_bound_bytes_per_s'] / 1e9:.2f} GB/s of memory-bound bytes (activations, logits) "
          f"(FLOPs only: {calibration['flops_only_flops_per_s'] / 1e9:.1f} GFLOP/s for the whole step)")
    print(format_table(results, args.tolerance))
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")
    worst = worst_error(results)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if not key.startswith("recipe") and key != "specs"}
    save_record("bench_sizing_cpu", RESULTS_DIR, args.output or RESULTS_DIR / "sizing_cpu.json", argv, info,
                load_before, load_after, settings=settings, data=source.describe(args.data_dir),
                calibration=calibration, tolerance=args.tolerance, within_tolerance=worst <= args.tolerance,
                results=[{k: v for k, v in r.items() if k != "model_config"} for r in results])
    return 0


# --------------------------------------------------------------------------------------------------------------------
# The recipe check: checkpoint and exact resume of recipes/pretrain.py
# --------------------------------------------------------------------------------------------------------------------


def run_recipe(output_dir: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """recipes/pretrain.py in a fresh process; its stdout lines. Same threads in every run: bitwise equality."""
    command = [sys.executable, str(RECIPE), "--config", str(RECIPE_CONFIG), f"--preset={args.recipe_preset}",
               f"--model_overrides={json.dumps(args.recipe_model_overrides)}",
               f"--data_dir={args.data_dir.resolve()}", f"--output_dir={output_dir}",
               f"--max_steps={args.recipe_steps}", f"--save_steps={args.recipe_save_steps}", "--warmup_steps=1",
               "--learning_rate=6e-4", "--logging_steps=1", "--eval_strategy=no", "--max_eval_blocks=4",
               f"--per_device_train_batch_size={args.recipe_batch_size}", "--gradient_accumulation_steps=1",
               "--save_total_limit=4", "--dataloader_num_workers=0", "--disable_tqdm=true", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    print(f"  $ {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"recipes/pretrain.py exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout.splitlines()


def logged_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [{key: entry.get(key) for key in COMPARED} for entry in state["log_history"] if "loss" in entry]


def same_weights(first: Path, second: Path) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def recipe_check(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.data_dir is None:
        print("error: --recipe_check needs --data_dir (a data_prep run)", file=sys.stderr)
        return 2
    root = args.recipe_output_dir.resolve()
    if root.exists():
        shutil.rmtree(root)
    uninterrupted, resumed = root / "uninterrupted", root / "resumed"
    info = machine_info(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    reference_lines = run_recipe(uninterrupted, args)
    first_checkpoint = f"checkpoint-{args.recipe_save_steps}"
    shutil.copytree(uninterrupted / first_checkpoint, resumed / first_checkpoint)
    resumed_lines = run_recipe(resumed, args, "--resume_from_checkpoint=auto")
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    def training_logs(lines: list[str]) -> list[str]:
        return [line for line in lines if line.startswith("step ") and "| loss " in line]

    expected, actual = logged_steps(uninterrupted), logged_steps(resumed)
    checks = {
        "resumed_from_checkpoint": any(line.startswith("[pretrain] resuming from") for line in resumed_lines),
        "resumed_run_trained_only_the_rest": len(training_logs(resumed_lines)) == args.recipe_steps
        - args.recipe_save_steps,
        "every_step_logged": [e["step"] for e in expected] == list(range(1, args.recipe_steps + 1)),
        "same_loss_grad_norm_lr_every_step": actual == expected,
        "same_final_weights_bitwise": same_weights(uninterrupted, resumed),
        "run_reports_written": all((d / "run_report" / "report.md").is_file() for d in (uninterrupted, resumed)),
    }
    ok = all(checks.values())
    header = next((line for line in reference_lines if line.startswith("[pretrain]") and "parameters" in line), "")
    print(header)
    for line in training_logs(reference_lines):
        print(f"  uninterrupted  {line}")
    for line in training_logs(resumed_lines):
        print(f"  resumed        {line}")
    for name, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name.replace('_', ' ')}")
    print(f"recipe check: {'passed' if ok else 'FAILED'} in {elapsed:.0f} s; run reports in "
          f"{uninterrupted / 'run_report'} and {resumed / 'run_report'}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if key.startswith("recipe") or key in ("data_dir", "threads")}
    save_record("bench_sizing_cpu", RESULTS_DIR, args.output or RESULTS_DIR / "sizing_recipe_check_cpu.json", argv,
                info, load_before, load_after, settings=settings, mode="recipe_check", header=header,
                uninterrupted_log=expected, resumed_log=actual, checks=checks, passed=ok, seconds=elapsed,
                run_reports=[str(d / "run_report" / "report.md") for d in (uninterrupted, resumed)])
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.recipe_check:
        return recipe_check(args, argv)
    return run_measurements(args, argv)


if __name__ == "__main__":
    sys.exit(main())
