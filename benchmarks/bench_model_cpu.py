"""CPU speed of Ember against stock transformers `LlamaForCausalLM` of the same shape.

What it measures
----------------
Wall-clock time of one training step (forward with `labels=input_ids`, so the loss is included, then
`loss.backward()`; gradients are reset with `zero_grad()` before every step) for two models that compute
the same function:

* `EmberForCausalLM` built from an `EmberConfig` (a named preset plus optional `--override key=value`),
* `LlamaForCausalLM` built from the equivalent `LlamaConfig`, with Ember's weights loaded into it
  (`load_state_dict(strict=True)`; module names are identical).

Before timing, the script checks that both produce the same logits (max abs diff <= `--tolerance`) and the
same loss. Both run in float32, in `train()` mode, with the same attention backend (`--attn`, default
sdpa), the same input batch and the same `torch.set_num_threads` (default: every core this process may use).
`use_cache=False` is passed to both: a training step has no use for a KV cache.

After `--warmup` untimed steps per model, `--rounds` rounds are timed. Each round times `--steps`
consecutive steps of one model, then `--steps` of the other, with `time.perf_counter`; the order flips
every round (Ember-Llama, Llama-Ember, ...) so slow drift in machine load hits both equally. Reported per
model: median and interquartile range of the per-step time (round time / steps), tokens per second, and the
ratio Ember / stock, both as a ratio of medians and as the median of the per-round ratios (the latter
compares steps that ran seconds apart, so it is the more robust number on a shared machine).

`--mode forward` times inference instead: `eval()`, `torch.no_grad()`, no labels.

How to run
----------
    .venv/bin/python benchmarks/bench_model_cpu.py                       # nano preset, batch 4 x 256 tokens
    .venv/bin/python benchmarks/bench_model_cpu.py --mode forward
    .venv/bin/python benchmarks/bench_model_cpu.py --preset nano \\
        --override hidden_size=512 intermediate_size=1408 num_hidden_layers=8 --batch_size 2

A table is printed and the full record (machine, command line, configs, raw per-round timings, summary) is
written as JSON to `--output` (default `benchmarks/results/model_cpu_<timestamp>.json`).
"""

from __future__ import annotations

import argparse
import ast
import gc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_common import available_cores, cpu_model_name, quartiles, save_record
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from modeling import EmberConfig, EmberForCausalLM
from modeling.configuration_ember import PRESETS
from modeling.convert import ember_config_to_hf

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAMES = ("ember", "llama")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is a Python literal if it parses as one, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time Ember vs stock LlamaForCausalLM (same shape, same weights) on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="nano", choices=sorted(PRESETS), help="EmberConfig preset")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="EmberConfig fields to override, e.g. hidden_size=512 num_hidden_layers=8",
    )
    # Underscores as every Ember command; hyphenated aliases for the recorded commands.
    parser.add_argument("--batch_size", "--batch-size", type=int, default=4)
    parser.add_argument("--seq_len", "--seq-len", type=int, default=256)
    parser.add_argument(
        "--mode",
        choices=("train", "forward"),
        default="train",
        help="train: forward+loss+backward; forward: inference under no_grad",
    )
    parser.add_argument("--attn", default="sdpa", help="attention implementation for both models (eager, sdpa, ...)")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before measuring")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each model once per round)")
    parser.add_argument("--steps", type=int, default=5, help="steps per model per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed")
    parser.add_argument("--target", type=float, default=0.05, help="allowed slowdown of Ember vs stock (fraction)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON result path (default: benchmarks/results/model_cpu_<timestamp>.json)",
    )
    args = parser.parse_args(argv)
    if min(args.batch_size, args.seq_len, args.threads, args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("sizes, threads, rounds and steps must be positive; warmup must be >= 0")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def build_ember_config(preset: str, overrides: dict[str, Any]) -> EmberConfig:
    config = EmberConfig.from_preset(preset, **overrides)
    try:  # only the LLaMA subset of Ember's switches has a stock counterpart
        stock = ember_config_to_hf(config)
    except ValueError as error:
        raise SystemExit(f"error: no like-for-like stock model: {error}") from None
    if not isinstance(stock, LlamaConfig) or config.hidden_dropout:
        raise SystemExit("error: the comparison is against stock Llama: no sliding window, MoE or hidden dropout")
    return config


def build_models(config: EmberConfig, attn: str, seed: int) -> dict[str, PreTrainedModel]:
    torch.manual_seed(seed)
    ember = EmberForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    llama = LlamaForCausalLM._from_config(ember_config_to_hf(config), attn_implementation=attn, dtype=torch.float32)
    llama.load_state_dict(ember.state_dict(), strict=True)
    for name, model in (("ember", ember), ("llama", llama)):
        actual = model.config._attn_implementation
        if actual != attn:
            raise SystemExit(f"{name}: asked for attn_implementation={attn!r}, got {actual!r}")
    return {"ember": ember, "llama": llama}


def check_equivalence(models: dict[str, PreTrainedModel], input_ids: torch.Tensor) -> dict[str, float]:
    """Max abs difference of logits (eval, no_grad) and of the training loss between the two models."""
    logits: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            logits[name] = model(input_ids=input_ids, use_cache=False).logits
            model.train()
            losses[name] = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
    return {
        "max_abs_logit_diff": (logits["ember"] - logits["llama"]).abs().max().item(),
        "max_abs_logit": logits["llama"].abs().max().item(),
        "loss_ember": losses["ember"],
        "loss_llama": losses["llama"],
    }


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def train_step(model: PreTrainedModel, input_ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()


def forward_step(model: PreTrainedModel, input_ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)


def time_block(model: PreTrainedModel, input_ids: torch.Tensor, mode: str, steps: int) -> list[float]:
    """Run `steps` steps back to back; return each step's seconds."""
    step = train_step if mode == "train" else forward_step
    gc.collect()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, input_ids)
        times.append(time.perf_counter() - start)
    return times


def run_benchmark(
    models: dict[str, PreTrainedModel], input_ids: torch.Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    for model in models.values():
        model.train(args.mode == "train")
    for name in NAMES:  # warm-up: allocator, oneDNN primitive caches, lazy imports
        time_block(models[name], input_ids, args.mode, args.warmup)

    rounds = []
    for index in range(args.rounds):
        order = NAMES if index % 2 == 0 else NAMES[::-1]
        record: dict[str, Any] = {"round": index, "order": list(order)}
        for name in order:
            step_times = time_block(models[name], input_ids, args.mode, args.steps)
            record[name] = {"block_s": sum(step_times), "step_s": step_times}
        record["ratio"] = record["ember"]["block_s"] / record["llama"]["block_s"]
        rounds.append(record)
        print(
            f"  round {index + 1:2d}/{args.rounds}  ember {1e3 * record['ember']['block_s'] / args.steps:8.1f} ms  "
            f"llama {1e3 * record['llama']['block_s'] / args.steps:8.1f} ms  ratio {record['ratio']:.3f}",
            flush=True,
        )
    return rounds


def summarise(rounds: list[dict[str, Any]], steps: int, tokens_per_step: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in NAMES:
        per_step = [r[name]["block_s"] / steps for r in rounds]
        q1, median, q3 = quartiles(per_step)
        summary[name] = {
            "median_step_s": median,
            "q1_step_s": q1,
            "q3_step_s": q3,
            "iqr_step_s": q3 - q1,
            "min_step_s": min(per_step),
            "tokens_per_s": tokens_per_step / median,
        }
    ratios = [r["ratio"] for r in rounds]
    r_q1, r_median, r_q3 = quartiles(ratios)
    summary["ratio_of_medians"] = summary["ember"]["median_step_s"] / summary["llama"]["median_step_s"]
    summary["median_round_ratio"] = r_median
    summary["round_ratio_q1"] = r_q1
    summary["round_ratio_q3"] = r_q3
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def print_table(summary: dict[str, Any], unit: str) -> None:
    header = f"{'model':<8} {'median ' + unit:>16} {'IQR (q1-q3)':>22} {'min':>10} {'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for name in NAMES:
        s = summary[name]
        iqr = f"{1e3 * s['q1_step_s']:.1f}-{1e3 * s['q3_step_s']:.1f} ms"
        print(
            f"{name:<8} {1e3 * s['median_step_s']:13.1f} ms {iqr:>22} {1e3 * s['min_step_s']:7.1f} ms "
            f"{s['tokens_per_s']:10.0f}"
        )
    print("-" * len(header))
    print(f"ratio ember/llama (of medians):         {summary['ratio_of_medians']:.3f}")
    print(
        f"ratio ember/llama (median of rounds):   {summary['median_round_ratio']:.3f}  "
        f"(IQR {summary['round_ratio_q1']:.3f}-{summary['round_ratio_q3']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(args.override)
    config = build_ember_config(args.preset, overrides)
    models = build_models(config, args.attn, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    tokens_per_step = args.batch_size * args.seq_len
    n_params = count_parameters(models["ember"])
    info = machine_info()

    print(
        f"machine: {info['cpu_model']} | {info['cpus_available']} cores | torch {info['torch']} "
        f"({info['torch_threads']} threads) | transformers {info['transformers']}"
    )
    print(
        f"model:   preset={args.preset} overrides={overrides} | {n_params / 1e6:.2f}M params | "
        f"L={config.num_hidden_layers} d={config.hidden_size} ff={config.intermediate_size} "
        f"heads={config.num_attention_heads}/{config.num_key_value_heads} vocab={config.vocab_size}"
    )
    print(
        f"run:     mode={args.mode} attn={args.attn} batch={args.batch_size} seq={args.seq_len} float32 | "
        f"warmup={args.warmup} rounds={args.rounds} steps/round={args.steps}"
    )

    check = check_equivalence(models, input_ids)
    ok = check["max_abs_logit_diff"] <= args.tolerance
    print(
        f"check:   max |logits_ember - logits_llama| = {check['max_abs_logit_diff']:.3e} "
        f"(tolerance {args.tolerance:g}) -> {'OK' if ok else 'FAIL'}; "
        f"loss ember {check['loss_ember']:.6f} llama {check['loss_llama']:.6f}"
    )
    if not ok:
        print("error: the two models do not compute the same function; timings would be meaningless", file=sys.stderr)
        return 1

    load_before = os.getloadavg()
    started = time.perf_counter()
    rounds = run_benchmark(models, input_ids, args)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    summary = summarise(rounds, args.steps, tokens_per_step)

    unit = "step" if args.mode == "train" else "fwd"
    print()
    print_table(summary, unit)
    slowdown = summary["median_round_ratio"] - 1.0
    verdict = "within" if slowdown <= args.target else "OUTSIDE"
    print(f"target:  Ember within {100 * args.target:.0f}% of stock -> {verdict} ({100 * slowdown:+.1f}%)")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min); timed {elapsed:.0f} s")

    settings = {"preset": args.preset, "overrides": overrides, "mode": args.mode, "attn_implementation": args.attn,
                "dtype": "float32", "batch_size": args.batch_size, "seq_len": args.seq_len,
                "tokens_per_step": tokens_per_step, "threads": args.threads, "warmup": args.warmup,
                "rounds": args.rounds, "steps_per_round": args.steps, "seed": args.seed, "use_cache": False}
    save_record("bench_model_cpu", RESULTS_DIR, args.output, argv, info, load_before, load_after, name="model_cpu",
                settings=settings, parameters=n_params, ember_config=config.to_diff_dict(),
                llama_config=models["llama"].config.to_diff_dict(),
                equivalence_check={**check, "tolerance": args.tolerance, "ok": ok}, rounds=rounds,
                summary={**summary, "target_slowdown": args.target, "within_target": slowdown <= args.target})
    return 0


if __name__ == "__main__":
    sys.exit(main())
