"""Levers on the quickstart's pretraining, each at equal wall time: held-out bits per byte after the same
training time.

    python benchmarks/bench_quickstart_levers.py --arms benchmarks/quickstart_levers.yaml --seconds 420 \\
        [--only baseline,lr16e-3] [--work_dir outputs/levers] [--output benchmarks/results/quickstart_levers]

Every arm is `recipes/pretrain.py` (in this process) with the quickstart's pretraining config and overrides
(`recipes/configs/quickstart_cpu.yaml`), then the arm's own `pretrain` overrides; an arm with `data` overrides
(dotted pipeline keys: a vocabulary size, a block length) first runs the data pipeline with them (cached per
setting). An arm fixes its `steps` (from its shape's measured step time, so that its training takes the
budget's time), or the arm's step time is measured first (`--calibration_steps` steps after 2 untimed, by the
recipe itself) and it trains `seconds / step time` steps; an arm whose steps cost what another's do names it in
`step_seconds_of` and shares its measurement. Warmup is a fixed fraction of the steps. Every arm is scored like
the quickstart's held-out stage (`evaluation.perplexity` on its documents and windows); its measured training
time is recorded beside the score, so the table shows how equal the times came out.

Each finished arm is appended to `<output>.jsonl` at once (a long sweep survives an interruption; `--keep` skips
arms already there), and `<output>.md` is rewritten with every row so far.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from benchmarks.bench_quickstart_optimizers import bits_per_byte, pretrain  # noqa: E402
from cli import dotted_items  # noqa: E402
from data_prep.config import load_config  # noqa: E402
from data_prep.pipeline import run_pipeline  # noqa: E402
from data_prep.token_dataset import PackedDataset  # noqa: E402
from modeling.loading import load_checkpoint  # noqa: E402

QUICKSTART_CONFIG = REPO_ROOT / "recipes" / "configs" / "quickstart_cpu.yaml"
CALIBRATION_LOG_STEPS = 4  # a log (and its throughput record) every step would slow the steps it measures


def data_dir_for(quickstart: dict, overrides: dict, work: Path, default: Path) -> Path:
    """The quickstart's data stage output, or one made with `overrides` (dotted pipeline keys), cached by them."""
    if not overrides:
        return default
    key = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    out = work / f"data_{key}"
    if not (out / "report.json").is_file():
        config = (QUICKSTART_CONFIG.parent / quickstart["data_config"]).resolve()
        run_pipeline(load_config(config, {**dotted_items(overrides), "output_dir": str(out)}), workers=2)
    return out


def median_step_seconds(state: dict, tokens_per_step: int) -> float:
    """Median seconds per step over the timed logs (ThroughputCallback leaves the first two steps out)."""
    return tokens_per_step / statistics.median(e["tokens_per_s"] for e in state["log_history"] if "tokens_per_s" in e)


def table(rows: list[dict]) -> str:
    lines = ["| arm | what changes | s/step | steps | tokens | train s | held-out bits/byte | vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    base = next((r["bits_per_byte"] for r in rows if r["arm"] == "baseline"), None)
    for r in rows:
        change = f"{(r['bits_per_byte'] / base - 1) * 100:+.1f}%" if base else ""
        lines.append(f"| {r['arm']} | {r['description']} | {r['step_seconds']:.3f} | {r['max_steps']} | "
                     f"{r['tokens']:,} | {r['train_runtime']:.0f} | {r['bits_per_byte']:.4f} | {change} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=Path, required=True, help="YAML: name -> {description, pretrain, data, steps}")
    parser.add_argument("--only", default="", help="comma-separated arm names (default: all, in the file's order)")
    parser.add_argument("--seconds", type=float, default=420.0, help="training time of every arm")
    parser.add_argument("--quickstart_dir", type=Path, default=REPO_ROOT / "outputs" / "quickstart")
    parser.add_argument("--warmup_fraction", type=float, default=0.1)
    parser.add_argument("--calibration_steps", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="skip arms already in <output>.jsonl")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: <quickstart_dir>/levers")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "quickstart_levers")
    args = parser.parse_args(argv)

    quickstart = yaml.safe_load(QUICKSTART_CONFIG.read_text())
    config = (QUICKSTART_CONFIG.parent / quickstart["pretrain_config"]).resolve()
    default_data = args.quickstart_dir / "data"
    work = args.work_dir or args.quickstart_dir / "levers"
    evaluation = {"window": quickstart["eval_window"], "stride": quickstart["eval_stride"],
                  "batch_size": quickstart["eval_batch_size"],
                  "max_documents": quickstart["eval_max_documents"] or None}
    arms = yaml.safe_load(args.arms.read_text())
    names = args.only.split(",") if args.only else list(arms)
    rows_path = args.output.with_suffix(".jsonl")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    done = {row["arm"] for row in rows}
    machine = {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    calibrated = {row["arm"]: row["step_seconds"] for row in rows}
    for name in names:
        if args.keep and name in done:
            continue
        arm = arms[name]
        data_dir = data_dir_for(quickstart, arm.get("data", {}), work, default_data)
        base = {**quickstart["pretrain_overrides"], **arm.get("pretrain", {}), "data_dir": str(data_dir),
                "eval_strategy": "no", "disable_tqdm": True, "report_to": "none"}
        load_before = os.getloadavg()[0]
        block = PackedDataset(data_dir / "tokens" / "train").seq_len
        rows_per_step = base.get("per_device_train_batch_size", 4) * base.get("gradient_accumulation_steps", 1)
        tokens_per_step = rows_per_step * block
        steps = arm.get("steps")
        step_seconds = calibrated.get(arm.get("step_seconds_of", ""))
        if steps is None:
            if step_seconds is None:
                state = pretrain(config, {**base, "max_steps": args.calibration_steps + 2, "warmup_steps": 1,
                                          "logging_steps": CALIBRATION_LOG_STEPS, "save_strategy": "no"},
                                 work / f"{name}_calibrate")
                step_seconds = median_step_seconds(state, tokens_per_step)
            calibrated[name] = step_seconds
            steps = max(10, round(args.seconds / step_seconds))
        warmup = arm.get("pretrain", {}).get("warmup_steps", max(1, round(args.warmup_fraction * steps)))
        out = work / name
        state = pretrain(config, {**base, "max_steps": steps, "warmup_steps": warmup, "save_strategy": "steps",
                                  "save_steps": steps, "save_total_limit": 1}, out)
        train_runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
        row = {"arm": name, "description": arm.get("description", ""), "pretrain": arm.get("pretrain", {}),
               "data": arm.get("data", {}), "max_steps": steps, "warmup_steps": warmup,
               "step_seconds": step_seconds or train_runtime / steps, "train_runtime": train_runtime,
               "tokens": steps * tokens_per_step,
               "last_logged_loss": [e["loss"] for e in state["log_history"] if "loss" in e][-1],
               "bits_per_byte": bits_per_byte(*load_checkpoint(out, device="cpu"), data_dir, evaluation),
               "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]}, "machine": machine,
               "seconds_budget": args.seconds, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        rows = [r for r in rows if r["arm"] != name] + [row]
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        args.output.with_suffix(".md").write_text(table(rows))
        print(json.dumps({k: row[k] for k in ("arm", "max_steps", "step_seconds", "train_runtime", "bits_per_byte")}),
              flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    transformers.logging.set_verbosity_warning()
    sys.exit(main())
