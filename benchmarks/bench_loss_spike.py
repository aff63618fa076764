"""Loss-spike handling as a user meets it, on 2 CPU ranks: a clean run whose loss rises where the corpus moves on to
other files (a shift, which must not kill the run), and a long corrupted region (eight steps' worth of blocks read
through the reversed vocabulary, as text in the wrong encoding), with and without `loss_spike_zscore`.

    python benchmarks/bench_loss_spike.py [--work_dir outputs/loss_spike] [--max_steps 60]

The data: `python -m data_prep` on the embedded corpus (60 documents, vocabulary 512, blocks of 64 tokens), read
in order (`train_sampling_strategy: sequential`); 2 ranks x 4 rows, so step s reads blocks 8(s-1) to 8s-1. Every
arm is `accelerate launch recipes/pretrain.py` with the same seed and settings (a 2-layer model of width 64).
Reported per arm: the largest training loss over the bad steps, the mean of the last 5 steps, the validation loss
of the final model, and each rollback with what the screen of the blocks decided. Results: `--output` .json, .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.config import load_config  # noqa: E402
from data_prep.pipeline import run_pipeline  # noqa: E402

NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CPU_DDP = REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"
BLOCKS_PER_STEP = 8  # 2 ranks x 4 rows


def corrupt(data_dir: Path, first: int, count: int) -> None:
    """Read the tokens of blocks [first, first + count) of the training shard through the reversed vocabulary."""
    (shard,) = [p for p in sorted((data_dir / "tokens" / "train").glob("*.json")) if p.with_suffix(".bin").is_file()]
    metadata = json.loads(shard.read_text())
    tokens = np.memmap(shard.with_suffix(".bin"), dtype=np.dtype(metadata["dtype"]), mode="r+",
                       shape=(metadata["num_tokens"],))
    # Block i is tokens [i x seq_len, (i + 1) x seq_len]: from the second token of `first` on, only bad blocks change.
    start, end = first * metadata["seq_len"] + 1, (first + count) * metadata["seq_len"] + 1
    tokens[start:end] = metadata["vocab_size"] - 1 - tokens[start:end]
    tokens.flush()


def pretrain(data_dir: Path, out: Path, settings: list[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               str(REPO_ROOT / "recipes" / "pretrain.py"), "--config", str(NANO_CPU), f"--data_dir={data_dir}",
               f"--output_dir={out}", *settings]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{out.name}: pretraining failed\n{result.stderr[-3000:]}")
    return result.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=REPO_ROOT / "outputs" / "loss_spike")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--corrupt_first", type=int, default=160, help="first bad block (step 21 reads it)")
    parser.add_argument("--corrupt_blocks", type=int, default=64, help="bad blocks: 8 steps' worth")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "loss_spike")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    clean = args.work_dir / "data_clean"
    if not (clean / "tokens" / "train").is_dir():
        run_pipeline(load_config(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml", [
            f"--output_dir={clean}", "--num_shards=1", "--sources.0.max_docs=60", "--tokenizer.vocab_size=512",
            "--pack.seq_len=64", "--validation_fraction=0.1"]))
    bad = args.work_dir / "data_corrupted"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(clean, bad)
    corrupt(bad, args.corrupt_first, args.corrupt_blocks)
    first_bad = args.corrupt_first // BLOCKS_PER_STEP + 1
    bad_steps = range(first_bad, (args.corrupt_first + args.corrupt_blocks - 1) // BLOCKS_PER_STEP + 2)

    settings = ["--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
                "num_attention_heads: 4, num_key_value_heads: 2}", f"--max_steps={args.max_steps}", "--save_steps=5",
                "--save_total_limit=20", "--warmup_steps=2", "--logging_steps=1", "--eval_strategy=no",
                "--per_device_train_batch_size=4", "--train_sampling_strategy=sequential", "--disable_tqdm=true",
                "--report_to=none"]
    spikes = ["--loss_spike_zscore=4", "--loss_spike_window=10"]
    arms = {"clean data, no spike handling": (clean, []), "clean data, loss_spike_zscore 4": (clean, spikes),
            "bad region, no spike handling": (bad, []), "bad region, loss_spike_zscore 4": (bad, spikes)}
    rows = []
    for name, (data_dir, extra) in arms.items():
        out = args.work_dir / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        lines = pretrain(data_dir, out, settings + extra)
        state = json.loads((out / "trainer_state.json").read_text())
        losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
        data_state = out / f"checkpoint-{args.max_steps}" / "data_state.json"
        rows.append({"arm": name, "max_loss_bad_steps": max(losses[s] for s in bad_steps),
                     "loss_before_bad_steps": losses[bad_steps[0] - 1],
                     "mean_loss_last_5": sum(losses[s] for s in range(args.max_steps - 4, args.max_steps + 1)) / 5,
                     "eval_loss": json.loads((out / "all_results.json").read_text())["eval_loss"],
                     "rollbacks": json.loads(data_state.read_text())["rollbacks"] if data_state.is_file() else [],
                     "spike_lines": [line for line in lines if line.startswith("[pretrain] loss spike")],
                     "losses": losses})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)

    record = {"benchmark": "loss_spike", "command": " ".join([sys.executable, *sys.argv]),
              "machine": {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__},
              "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
              "bad_blocks": [args.corrupt_first, args.corrupt_first + args.corrupt_blocks],
              "bad_steps": [bad_steps[0], bad_steps[-1]], "settings": settings, "spike_settings": spikes,
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")

    def decision(e: dict) -> str:
        if e["decision"] == "shift":
            return f"a shift ({e['why']}), nothing skipped"
        ranges = ", ".join(f"{a}-{b - 1}" for a, b in e["skipped_blocks"])
        return f"{e['anomalous_blocks']} bad blocks skipped ({ranges})"

    def rollbacks(row: dict) -> str:
        return "; ".join(
            f"spike at step {e['spike_step']} (z {e['zscore']:.1f}), back to step {e['resumed_from_step']}, steps "
            f"{e['screened_steps'][0]}-{e['screened_steps'][1]} scored against {e['block_threshold']:.3f}: "
            f"{decision(e)}" for e in row["rollbacks"]) or "-"

    lines = [f"Bad region: blocks {args.corrupt_first}-{args.corrupt_first + args.corrupt_blocks - 1} (steps "
             f"{bad_steps[0]}-{bad_steps[-1]}) read through the reversed vocabulary; {args.max_steps} steps on 2 CPU "
             "ranks.", "",
             "| arm | loss before the bad steps | largest loss over them | mean loss, last 5 steps | "
             "validation loss | rollbacks |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['loss_before_bad_steps']:.3f} | {r['max_loss_bad_steps']:.3f} | "
              f"{r['mean_loss_last_5']:.3f} | {r['eval_loss']:.3f} | {rollbacks(r)} |" for r in rows]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
