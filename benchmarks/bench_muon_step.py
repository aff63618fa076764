"""What Muon's optimizer step costs on CPU next to the forward and backward pass, for the quickstart's model.

The nano preset (6.5 M parameters) on one batch of 4 x 512 random tokens, `--threads` torch threads:
forward + backward, then the optimizer step alone, for AdamW and for Ember's `MuonWithAdamW` at each
`--ns_steps` (Newton-Schulz iterations; 5 is torch's and Ember's default). Each number is the median of
`--rounds` timed repeats after two warm-up ones. Only time this on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_muon_step.py [--ns_steps 5 3] [--rounds 10] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.bench_common import save_record  # noqa: E402
from modeling import EmberConfig, EmberForCausalLM  # noqa: E402
from reporting.run_report import available_cores, cpu_model_name  # noqa: E402
from training.muon import MuonWithAdamW, muon_parameter_groups  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def median_seconds(fn, rounds: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns_steps", type=int, nargs="+", default=[5, 3])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EmberForCausalLM(EmberConfig.from_preset("nano"))
    batch = torch.randint(0, model.config.vocab_size, (4, 512))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()

    load_before = os.getloadavg()
    seconds = {"forward_backward": median_seconds(forward_backward, args.rounds)}
    decay = {name for name, p in model.named_parameters() if p.dim() >= 2}
    optimizers = {"adamw": torch.optim.AdamW(model.parameters(), lr=1e-3)}
    for ns in args.ns_steps:
        groups = muon_parameter_groups(model, decay, lr=1e-3, muon_lr=1e-3, weight_decay=0.1, momentum=0.95,
                                       nesterov=True, ns_steps=ns, lr_scaling="match_rms_adamw")
        optimizers[f"muon_ns{ns}"] = MuonWithAdamW(groups, lr=1e-3)
    for name, optimizer in optimizers.items():
        seconds[f"step_{name}"] = median_seconds(optimizer.step, args.rounds)
    for name, value in seconds.items():
        print(f"{name:>20}: {value * 1000:8.1f} ms")
    machine = {"cpu": cpu_model_name(), "cores": available_cores(), "threads": args.threads,
               "torch": torch.__version__}
    save_record("bench_muon_step", RESULTS_DIR, args.output, argv, machine, load_before, os.getloadavg(),
                name="muon_step", seconds=seconds, batch=[4, 512], preset="nano", rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
