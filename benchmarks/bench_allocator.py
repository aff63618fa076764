"""What `training.run.keep_freed_memory` buys on CPU: the quickstart's pretraining steps and its held-out scoring
under glibc's default allocator settings and with freed memory kept, the two arms alternated in fresh processes.

    .venv/bin/python benchmarks/bench_allocator.py [--quickstart_dir outputs/quickstart] [--steps 100] [--rounds 3]

Needs a finished quickstart (its data and its checkpoint). Each round runs both arms, in alternating order, each in
a new process: `--steps` pretraining steps with the quickstart's own settings (no evaluation, no checkpoint; the
Trainer's train_runtime and the loss reached), then the untrained and the pretrained model's held-out bits per
byte as the quickstart scores them (seconds and the numbers). Page faults are the process's minor faults
(getrusage). Only time this on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import training.run  # noqa: E402
from benchmarks.bench_common import available_cores, cpu_model_name, save_record  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CONFIG = REPO_ROOT / "recipes" / "configs" / "quickstart_cpu.yaml"
ARMS = ("glibc default", "keep_freed_memory")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(arm: str, quickstart_dir: Path, steps: int) -> dict:
    """One arm in this process: pretraining steps, then the two held-out scores."""
    if arm == ARMS[1]:
        training.run.keep_freed_memory()
    else:  # the recipes set it themselves: keep the default for this arm
        training.run.keep_freed_memory = lambda *args, **kwargs: False
    from evaluation.perplexity import evaluate_path  # after the arm's setting: nothing allocated before it counts
    from modeling.loading import load_checkpoint
    from recipes import pretrain

    torch.set_float32_matmul_precision("high")  # as recipes/quickstart.py runs
    quickstart = yaml.safe_load(CONFIG.read_text())
    data_dir = quickstart_dir / "data"
    row: dict = {"arm": arm}
    with tempfile.TemporaryDirectory() as output_dir:
        start_faults = faults()
        code = pretrain.main(config=CONFIG.parent / quickstart["pretrain_config"], overrides={
            **quickstart["pretrain_overrides"], "data_dir": str(data_dir), "output_dir": output_dir,
            "max_steps": steps, "eval_strategy": "no", "save_strategy": "no", "report_to": "none"})
        if code != 0:
            raise SystemExit(f"pretraining exited with {code}")
        results = json.loads((Path(output_dir) / "all_results.json").read_text())
        history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
        row.update(pretrain_seconds=results["train_runtime"], pretrain_faults=faults() - start_faults,
                   last_loss=[entry["loss"] for entry in history if "loss" in entry][-1])

    model, tokenizer = load_checkpoint(quickstart_dir / "pretrain", device="cpu")
    torch.manual_seed(0)  # as the quickstart's held-out stage builds its untrained model
    untrained = type(model)._from_config(model.config, attn_implementation="sdpa").eval()
    options = dict(window=quickstart["eval_window"], stride=quickstart["eval_stride"],
                   batch_size=quickstart["eval_batch_size"], max_documents=quickstart["eval_max_documents"],
                   progress=False)
    start, start_faults = time.perf_counter(), faults()
    with torch.no_grad():
        scores = {name: evaluate_path(m, tokenizer, data_dir / "documents" / "validation", **options).bits_per_byte
                  for name, m in (("untrained", untrained), ("pretrained", model))}
    row.update(score_seconds=time.perf_counter() - start, score_faults=faults() - start_faults,
               bits_per_byte=scores)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart_dir", type=Path, default=REPO_ROOT / "outputs" / "quickstart")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quickstart_dir, args.steps)))
        return
    if not (args.quickstart_dir / "pretrain" / "config.json").is_file():
        raise SystemExit(f"{args.quickstart_dir}: no finished quickstart here (run `make quickstart` first)")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before, rows = os.getloadavg(), []
    for round_index in range(args.rounds):
        for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            out = subprocess.run([sys.executable, __file__, "--child", arm, "--quickstart_dir",
                                  str(args.quickstart_dir), "--steps", str(args.steps)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append({"round": round_index, **json.loads(out.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for arm in ARMS:
        mine = [row for row in rows if row["arm"] == arm]
        summary[arm] = {key: statistics.median(row[key] for row in mine)
                        for key in ("pretrain_seconds", "pretrain_faults", "score_seconds", "score_faults")}
    ratios = {key: summary[ARMS[1]][key] / summary[ARMS[0]][key] for key in ("pretrain_seconds", "score_seconds")}
    same = all(row["bits_per_byte"] == rows[0]["bits_per_byte"] and row["last_loss"] == rows[0]["last_loss"]
               for row in rows)
    print(f"median over {args.rounds} rounds: {json.dumps(summary, indent=1)}\n"
          f"kept / default: pretraining {ratios['pretrain_seconds']:.3f}, scoring {ratios['score_seconds']:.3f}; "
          f"same loss and bits per byte in every run: {same}")
    machine = {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__}
    save_record("allocator", RESULTS_DIR, args.output, None, machine, load_before, os.getloadavg(),
                steps=args.steps, rounds=rows, median=summary, kept_over_default=ratios, same_numbers=same)


if __name__ == "__main__":
    main()
