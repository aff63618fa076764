"""Held-out bits per byte of the quickstart's pretraining with AdamW vs Muon at equal wall time, and of the EMA and
checkpoint-averaged weights vs the final ones.

    python recipes/quickstart.py                      # first: the data stage (outputs/quickstart/data)
    python benchmarks/bench_quickstart_optimizers.py [--quickstart_dir outputs/quickstart] [--seconds 170] \\
        [--learning_rates 1e-3,2e-3,4e-3] [--optimizers adamw,muon] [--pretrain_overrides '{...}']

Every arm is `recipes/pretrain.py` (in this process) with the quickstart's pretraining config and overrides
(`recipes/configs/quickstart_cpu.yaml`), plus `optimizer` and `learning_rate` from the sweep; both optimizers get
the same learning rates (Muon with `muon_lr_scaling: match_rms_adamw`, so one learning rate serves both).

Equal wall time: first each optimizer's step time is measured side by side (`--calibration_rounds` rounds, the
optimizers alternating, `--calibration_steps` steps each after 2 untimed ones); each arm then gets
`max_steps = seconds / step time` steps, so its schedule (warmup `--warmup_fraction`, cosine) runs to its end
within the budget. The step counts, not the clock, then decide the result: a busy machine changes the measured
step-time ratio, which the JSON records, but not the training itself.

Each arm also keeps an EMA of its weights (`ema_decay` = 1 - 1 / (`--ema_fraction` x steps): it spans about the
last tenth of the run) and saves checkpoints at every tenth of the run; the last three are averaged
(`training.average.average_checkpoints`). Final, EMA and averaged weights are scored by `evaluation.perplexity`
on the quickstart's held-out documents with its window settings, next to the compressors (`evaluation.baselines`).
Results: `--output` .json (every arm, the calibration, the machine, the load) and .md (the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
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
from data_prep.documents import read_documents  # noqa: E402
from data_prep.token_dataset import PackedDataset  # noqa: E402
from evaluation.baselines import compressor_bits_per_byte  # noqa: E402
from evaluation.perplexity import evaluate_path  # noqa: E402
from modeling.loading import load_checkpoint  # noqa: E402
from recipes import pretrain as pretrain_recipe  # noqa: E402
from training.average import average_checkpoints  # noqa: E402
from training.plan import RunPlan  # noqa: E402

QUICKSTART_CONFIG = REPO_ROOT / "recipes" / "configs" / "quickstart_cpu.yaml"


def pretrain(config: Path, overrides: dict, output_dir: Path) -> dict:
    """recipes/pretrain.py in this process; returns the run's trainer_state.json."""
    shutil.rmtree(output_dir, ignore_errors=True)
    code = pretrain_recipe.main(config=config, overrides={**overrides, "output_dir": str(output_dir)})
    if code != 0:
        raise SystemExit(f"pretraining failed with status {code}: {output_dir}")
    gc.collect()
    return json.loads((output_dir / "trainer_state.json").read_text())


def finished_steps(output_dir: Path) -> int | None:
    """The steps of the finished run in `output_dir` (final weights, EMA and trainer state saved), else None."""
    state = output_dir / "trainer_state.json"
    if not (state.is_file() and (output_dir / "model.safetensors").is_file() and (output_dir / "ema").is_dir()):
        return None
    return json.loads(state.read_text()).get("global_step")


def step_seconds(state: dict, tokens_per_step: int) -> float:
    """Median seconds per step over the timed logs (ThroughputCallback leaves the first two steps out)."""
    rates = [entry["tokens_per_s"] for entry in state["log_history"] if "tokens_per_s" in entry]
    return tokens_per_step / statistics.median(rates)


def bits_per_byte(model, tokenizer, data_dir: Path, evaluation: dict) -> float:
    model.eval()
    with torch.no_grad():
        result = evaluate_path(model, tokenizer, data_dir / "documents" / "validation", **evaluation, progress=False)
    return result.bits_per_byte


def run_record(benchmark: str, load_before: tuple[float, float, float]) -> dict:
    """What every result file opens with: the benchmark, its command, the machine and its load around the run."""
    return {"benchmark": benchmark, "command": " ".join([sys.executable, *sys.argv]),
            "machine": {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": torch.get_num_threads()},
            "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart_dir", type=Path, default=REPO_ROOT / "outputs" / "quickstart")
    parser.add_argument("--quickstart_config", type=Path, default=QUICKSTART_CONFIG)
    parser.add_argument("--seconds", type=float, default=170.0, help="training time of every arm")
    parser.add_argument("--reference_steps", type=int, default=None,
                        help="instead of --seconds: the first optimizer's steps; the others get as many steps as "
                             "fit in its time by the measured step-time ratio (robust to a busy machine)")
    parser.add_argument("--equal_steps", action="store_true",
                        help="with --reference_steps: every optimizer gets that many steps (the calibration, if any, "
                             "only reports the step-time ratio)")
    parser.add_argument("--keep_finished", action="store_true",
                        help="score an arm whose folder already holds a finished run of its steps instead of "
                             "training it again (a sweep continued after an interruption)")
    parser.add_argument("--calibrate_only", action="store_true",
                        help="measure the optimizers' step times side by side, save them, and stop")
    parser.add_argument("--optimizers", default="adamw,muon")
    parser.add_argument("--learning_rates", default="1e-3,2e-3,4e-3")
    parser.add_argument("--pretrain_overrides", default="{}", help="YAML mapping over the quickstart's overrides")
    parser.add_argument("--warmup_fraction", type=float, default=0.1)
    parser.add_argument("--ema_fraction", type=float, default=0.1)
    parser.add_argument("--calibration_rounds", type=int, default=2)
    parser.add_argument("--calibration_steps", type=int, default=8)
    parser.add_argument("--work_dir", type=Path, default=None, help="default: <quickstart_dir>/optimizer_bench")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "quickstart_optimizers")
    args = parser.parse_args(argv)

    quickstart = yaml.safe_load(args.quickstart_config.read_text())
    config = (args.quickstart_config.parent / quickstart["pretrain_config"]).resolve()
    data_dir = args.quickstart_dir / "data"
    if not (data_dir / "tokens" / "train").is_dir():
        print(f"error: {data_dir}: no data stage output; run recipes/quickstart.py first", file=sys.stderr)
        return 2
    work = args.work_dir or args.quickstart_dir / "optimizer_bench"
    evaluation = {"window": quickstart["eval_window"], "stride": quickstart["eval_stride"],
                  "batch_size": quickstart["eval_batch_size"],
                  "max_documents": quickstart["eval_max_documents"] or None}
    # The sweep's learning rate is each optimizer's whole rate: a Muon rate the quickstart sets is left out.
    defaults = {k: v for k, v in quickstart["pretrain_overrides"].items() if k != "muon_learning_rate"}
    base = {**defaults, **yaml.safe_load(args.pretrain_overrides), "data_dir": str(data_dir),
            "eval_strategy": "no", "logging_steps": 10, "disable_tqdm": True, "report_to": "none"}
    optimizers = args.optimizers.split(",")
    learning_rates = [float(x) for x in args.learning_rates.split(",")]
    load_before = os.getloadavg()

    # 1. Step time of each optimizer, side by side.
    calibration: dict[str, list[float]] = {name: [] for name in optimizers}
    rounds = 0 if args.reference_steps and len(optimizers) == 1 else args.calibration_rounds
    if not rounds and args.reference_steps:
        calibration = {name: [args.seconds / args.reference_steps] for name in optimizers}
    for _ in range(rounds):
        for name in optimizers:
            steps = args.calibration_steps + 2
            state = pretrain(config, {**base, "optimizer": name, "max_steps": steps, "warmup_steps": 1,
                                      "logging_steps": 1, "save_strategy": "no"}, work / f"calibrate_{name}")
            settings = {**yaml.safe_load(config.read_text()), **base}
            plan = RunPlan(seq_len=PackedDataset(data_dir / "tokens" / "train").seq_len, data_parallel=1,
                           micro_batch_size=settings["per_device_train_batch_size"],
                           accumulation=settings["gradient_accumulation_steps"], max_steps=steps)
            calibration[name].append(step_seconds(state, plan.tokens_per_step))
    seconds_per_step = {name: statistics.median(times) for name, times in calibration.items()}
    if args.reference_steps:  # the budget: the first optimizer's reference_steps at its measured step time
        args.seconds = args.reference_steps * seconds_per_step[optimizers[0]]
    print("step seconds:", {name: round(value, 4) for name, value in seconds_per_step.items()}, flush=True)
    if args.calibrate_only:
        record = {**run_record("quickstart_optimizers_step_time", load_before),
                  "calibration_seconds_per_step": calibration, "seconds_per_step": seconds_per_step,
                  "ratio_to_first": {name: seconds_per_step[name] / seconds_per_step[optimizers[0]]
                                     for name in optimizers}}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["ratio_to_first"]))
        return 0

    # 2. The sweep at equal wall time.
    texts = list(read_documents(data_dir / "documents" / "validation"))
    compressors = compressor_bits_per_byte(texts, max_documents=evaluation["max_documents"])
    rows = []
    for lr in learning_rates:
        for name in optimizers:
            max_steps = (args.reference_steps if args.reference_steps and (args.equal_steps or name == optimizers[0])
                         else max(10, round(args.seconds / seconds_per_step[name])))
            save_steps = max(1, max_steps // 10)
            out = work / f"{name}_lr{lr:g}"
            started = time.perf_counter()
            if args.keep_finished and finished_steps(out) == max_steps:
                print(f"{out}: a finished run of {max_steps} steps, scored as it is", flush=True)
                state = json.loads((out / "trainer_state.json").read_text())
            else:
                state = pretrain(config, {**base, "optimizer": name, "learning_rate": lr, "max_steps": max_steps,
                                          "warmup_steps": max(1, round(args.warmup_fraction * max_steps)),
                                          "ema_decay": 1 - 1 / max(2.0, args.ema_fraction * max_steps),
                                          "save_strategy": "steps", "save_steps": save_steps,
                                          "save_total_limit": 3}, out)
            wall = time.perf_counter() - started
            model, tokenizer = load_checkpoint(out, device="cpu")
            row = {"optimizer": name, "learning_rate": lr, "max_steps": max_steps,
                   "train_runtime": next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e),
                   "wall_seconds": wall,
                   "last_logged_loss": [e["loss"] for e in state["log_history"] if "loss" in e][-1],
                   "bpb_final": bits_per_byte(model, tokenizer, data_dir, evaluation)}
            ema, _ = load_checkpoint(out / "ema", device="cpu")
            row["bpb_ema"] = bits_per_byte(ema, tokenizer, data_dir, evaluation)
            checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))[-3:]
            row["averaged_checkpoints"] = [p.name for p in checkpoints]
            row["bpb_checkpoint_average"] = bits_per_byte(average_checkpoints(checkpoints), tokenizer, data_dir,
                                                          evaluation)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, ema
            gc.collect()

    best = {name: min((r for r in rows if r["optimizer"] == name), key=lambda r: r["bpb_final"]) for name in optimizers}
    record = {
        **run_record("quickstart_optimizers", load_before),
        "seconds_budget": args.seconds, "calibration_seconds_per_step": calibration,
        "seconds_per_step": seconds_per_step, "pretrain_overrides": base, "evaluation": evaluation,
        "compressors": {name: r["bits_per_byte"] for name, r in compressors.items()}, "rows": rows,
        "best": {name: {k: row[k] for k in ("learning_rate", "bpb_final", "bpb_ema", "bpb_checkpoint_average")}
                 for name, row in best.items()},
    }
    if "adamw" in best and "muon" in best:
        record["muon_vs_adamw_best_final"] = best["muon"]["bpb_final"] / best["adamw"]["bpb_final"] - 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| optimizer | learning rate | steps | train s | final bits/byte | EMA | average of last 3 checkpoints |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['learning_rate']:g} | {r['max_steps']} | {r['train_runtime']:.0f} | "
              f"{r['bpb_final']:.4f} | {r['bpb_ema']:.4f} | {r['bpb_checkpoint_average']:.4f} |" for r in rows]
    lines += ["", "| compressor | bits/byte |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in record["compressors"].items()]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"saved: {args.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    transformers.logging.set_verbosity_warning()
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
