"""CPU step time of Ember's training step compiled (`torch.compile`, inductor, fullgraph) against eager, dense and MoE.

    python benchmarks/bench_compile_cpu.py [--preset nano] [--batch_size 4] [--seq_len 512] [--rounds 5]

One step is what the recipes run: forward with per-document position_ids and the loss (plus MoE's load-balancing
loss), backward, gradient clipping, AdamW. The compiled step compiles the model's forward with
`fullgraph=True` (no graph break allowed; `training.trainer.prepare_for_compile` first, as PretrainingTrainer
does with `torch_compile: true`). Both models start from the same weights and take the same batches; the
first compiled steps (compilation) are timed apart. Rounds alternate eager and compiled; medians are reported.
Results: `--output` .json (machine, load, every raw time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from modeling import EmberConfig, EmberForCausalLM  # noqa: E402
from training.trainer import prepare_for_compile  # noqa: E402


def make_step(model, compiled: bool):
    forward = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch):
        loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def batch_of(config: EmberConfig, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    documents = torch.arange(seq_len) % (seq_len // 2)  # two documents per row
    targets = ids[:, 1:].contiguous()
    return {"input_ids": ids[:, :-1].contiguous(), "labels": targets.clone(), "shift_labels": targets,
            "position_ids": documents.expand(batch_size, seq_len)}


def measure(name: str, overrides: dict, args) -> dict:
    config = EmberConfig.from_preset(args.preset, max_position_embeddings=max(args.seq_len, 1024), use_cache=False,
                                     **overrides)
    torch.manual_seed(0)
    eager_model = EmberForCausalLM._from_config(config, attn_implementation="sdpa").train()
    compiled_model = EmberForCausalLM._from_config(config, attn_implementation="sdpa").train()
    compiled_model.load_state_dict(eager_model.state_dict())
    prepare_for_compile(compiled_model)
    steps = {"eager": make_step(eager_model, False), "compiled": make_step(compiled_model, True)}
    generator = torch.Generator().manual_seed(0)
    batches = [batch_of(config, args.batch_size, args.seq_len, generator) for _ in range(args.warmup + args.steps)]
    started = time.perf_counter()
    first_compiled = [float(steps["compiled"](batches[0]))]
    compile_seconds = time.perf_counter() - started
    first_eager = [float(steps["eager"](batches[0]))]
    for batch in batches[1:args.warmup]:
        first_compiled.append(float(steps["compiled"](batch)))
        first_eager.append(float(steps["eager"](batch)))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for round_index in range(args.rounds):
        order = ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")
        for kind in order:
            started = time.perf_counter()
            for batch in batches[args.warmup:]:
                steps[kind](batch)
            times[kind].append((time.perf_counter() - started) / args.steps)
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"model": name, "overrides": overrides, "compile_seconds_first_step": compile_seconds,
            "first_losses": {"eager": first_eager, "compiled": first_compiled},
            "step_seconds": times, "median_eager": eager, "median_compiled": compiled,
            "speedup": eager / compiled, "tokens_per_step": args.batch_size * args.seq_len}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (the compiled model compiles here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "compile_cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [measure("dense", {}, args), measure("moe", {"num_local_experts": 4, "num_experts_per_tok": 2}, args)]
    record = {"benchmark": "compile_cpu", "command": " ".join([sys.executable, *sys.argv]),
              "machine": {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
              "settings": vars(args) | {"output": str(args.output)}, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']:6s} eager {row['median_eager']:.3f} s/step | compiled {row['median_compiled']:.3f} "
              f"s/step | speedup {row['speedup']:.2f}x | first compiled step {row['compile_seconds_first_step']:.0f} s")
    print(f"load average before/after: {record['load_average_1m']['before']:.2f} / "
          f"{record['load_average_1m']['after']:.2f}; saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
