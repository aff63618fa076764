"""How close the pretraining ETA came: the estimate `training.callbacks.EtaCallback` printed once a tenth of the
steps were done, against the time the steps left really took, for finished pretraining runs.

    python benchmarks/bench_eta.py RUN_DIR [RUN_DIR ...] [--output benchmarks/results/eta_check.json]

Each RUN_DIR is a pretraining output folder: `run_report/eta.json` holds the estimate (seconds per step over
its window, steps left, seconds since training began), `all_results.json` the Trainer's `train_runtime` and
`trainer_state.json` the evaluations. The steps left took train_runtime - elapsed seconds, less the
evaluations run after the window (the estimate leaves them out; they are listed); "whole run / its estimate" sets
the training's whole time (less evaluations) against elapsed + estimate, the ETA's error as a share of the run.
Nothing is trained here: the numbers are those of the runs named.

How long a window must be: from the throughput of each logging window (`tokens_per_s`, evaluations and saves
left out), the same estimate had the window been the first 5 / 10 / 20 / 30 / 50% of the steps, against what
the rest took (`took / estimate` per fraction; tokens per step cancel out of the ratio).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from reporting.run_report import ETA_FILE, REPORT_DIR  # noqa: E402


def check(run_dir: Path) -> dict:
    """Each estimate of one finished run against what its steps after the window took (without an eta.json,
    only the logging windows' ratios)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    row = {"run": str(run_dir), "by_window": window_ratios(history), "estimates": []}
    eta_file = run_dir / REPORT_DIR / ETA_FILE
    if not eta_file.is_file():
        return row
    runtime = json.loads((run_dir / "all_results.json").read_text())["train_runtime"]
    for eta in json.loads(eta_file.read_text())["estimates"]:
        evaluations = 0.0  # those the training loop ran after the window; the log's train summary ends the loop
        for entry in history:
            if "train_runtime" in entry:
                break
            if "eval_runtime" in entry and entry["step"] > eta["at_step"]:
                evaluations += entry["eval_runtime"]
        took = runtime - eta["elapsed_seconds"] - evaluations
        row["estimates"].append({**eta, "took_seconds": took, "evaluations_seconds": evaluations,
                                 "took_over_estimate": took / eta["remaining_seconds"],
                                 "run_seconds": runtime - evaluations,
                                 "run_over_estimate": (runtime - evaluations)
                                 / (eta["elapsed_seconds"] + eta["remaining_seconds"])})
    return row


FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


def window_ratios(history: list[dict]) -> dict[str, float]:
    """took / estimate of the steps left, for an estimate from each fraction of FRACTIONS of the logged steps."""
    logs = [entry for entry in history if "tokens_per_s" in entry]
    steps = [entry["step"] - previous["step"] for previous, entry in zip([{"step": 0}] + logs, logs)]
    seconds = [count / entry["tokens_per_s"] for count, entry in zip(steps, logs)]  # x tokens per step
    ratios = {}
    for fraction in FRACTIONS:
        cut = next((i + 1 for i in range(len(logs)) if sum(steps[:i + 1]) >= fraction * sum(steps)), len(logs))
        if cut < len(logs):
            per_step = sum(seconds[:cut]) / sum(steps[:cut])
            ratios[f"{fraction:g}"] = sum(seconds[cut:]) / (per_step * sum(steps[cut:]))
    return ratios


def tables(rows: list[dict]) -> list[str]:
    lines = ["| run | at | s/step (window) | steps left | estimate | its range | took | took / estimate | "
             "whole run / its estimate | evaluations |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for e in row["estimates"]:
            low, high = e.get("remaining_range_seconds") or (None, None)  # estimates written before it had one
            inside = low is not None and low <= e["took_seconds"] <= high
            spread = "-" if low is None else f"{low:.1f}-{high:.1f} s ({'in' if inside else 'out'})"
            lines.append(f"| {row['run']} | {e['fraction']:.0%} | {e['step_seconds']:.3f} ({e['window'][0]}-"
                         f"{e['window'][1]}) | {e['remaining_steps']:,} | {e['remaining_seconds']:.1f} s | {spread} | "
                         f"{e['took_seconds']:.1f} s | {e['took_over_estimate']:.3f} | {e['run_over_estimate']:.3f} | "
                         f"{e['evaluations_seconds']:.1f} s |")
    lines += ["", "| run | " + " | ".join(f"window {f:.0%}" for f in FRACTIONS) + " |",
              "|---|" + "---|" * len(FRACTIONS)]
    for row in rows:
        lines.append(f"| {row['run']} | " + " | ".join(f"{row['by_window'].get(f'{f:g}', float('nan')):.3f}"
                                                      for f in FRACTIONS) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, help="write the JSON here and the tables next to it (.md)")
    args = parser.parse_args(argv)
    rows = [check(run) for run in args.runs]
    lines = tables(rows)
    print("\n".join(lines))
    if args.output:
        command = " ".join(["python", "benchmarks/bench_eta.py", *(sys.argv[1:] if argv is None else argv)])
        machine = {"cpu": cpu_model_name(), "cores": available_cores()}
        args.output.write_text(json.dumps({"command": command, "machine": machine, "runs": rows}, indent=2) + "\n")
        args.output.with_suffix(".md").write_text("\n".join([
            "# How close the pretraining ETA came", "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores. Command: `{command}`. "
            "Each estimate (training.callbacks.EtaCallback: the mean step time so far times the steps left; its range "
            "the steps left at the pace of the window's fastest and slowest quarter) against what the steps left took "
            "(evaluations in between left out and listed); then, from each run's logged "
            "throughput, the same ratio had the window been the first 5-50% of the steps.", "", *lines, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
