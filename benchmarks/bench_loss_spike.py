"""A loss spike from bad data, with and without rollback: the same run on clean shards, on shards with a run of
random-token blocks and spike handling off, and on those shards with `loss_spike_zscore` on.

    python benchmarks/bench_loss_spike.py [--work_dir outputs/loss_spike] [--max_steps 60]

The data: a small `python -m data_prep` run on the embedded corpus (40 documents, vocabulary 512, blocks of 64
tokens), read in order (`train_sampling_strategy: sequential`) so the bad blocks arrive together; blocks
`--corrupt_first` to `--corrupt_first + --corrupt_blocks - 1` are replaced by uniformly random token ids. Every
arm is `recipes/pretrain.py` in this process with the same seed and settings (a 2-layer model of width 64,
4 rows per step, so step s reads blocks 4(s-1) to 4s-1). Reported per arm: the largest training loss over the
bad steps, the mean training loss of the last 5 steps, the validation loss of the final model, the rollbacks.
Results: `--output` .json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.config import load_config  # noqa: E402
from data_prep.pipeline import run_pipeline  # noqa: E402
from recipes import pretrain as pretrain_recipe  # noqa: E402

NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"


def corrupt(data_dir: Path, first: int, count: int, seed: int = 0) -> None:
    """Replace the tokens of blocks [first, first + count) of the training shard by random token ids."""
    (shard,) = [p for p in sorted((data_dir / "tokens" / "train").glob("*.json")) if p.with_suffix(".bin").is_file()]
    metadata = json.loads(shard.read_text())
    tokens = np.memmap(shard.with_suffix(".bin"), dtype=np.dtype(metadata["dtype"]), mode="r+",
                       shape=(metadata["num_tokens"],))
    # Block i is tokens [i x seq_len, (i + 1) x seq_len]: from the second token of `first` on, only bad blocks change.
    start, end = first * metadata["seq_len"] + 1, (first + count) * metadata["seq_len"] + 1
    tokens[start:end] = np.random.default_rng(seed).integers(0, metadata["vocab_size"], end - start)
    tokens.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=REPO_ROOT / "outputs" / "loss_spike")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--corrupt_first", type=int, default=120, help="first bad block (step 31 reads it)")
    parser.add_argument("--corrupt_blocks", type=int, default=16, help="bad blocks: 4 steps' worth")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "loss_spike")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    load_before = os.getloadavg()

    clean = args.work_dir / "data_clean"
    if not (clean / "tokens" / "train").is_dir():
        run_pipeline(load_config(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml", [
            f"--output_dir={clean}", "--num_shards=1", "--sources.0.max_docs=40", "--tokenizer.vocab_size=512",
            "--pack.seq_len=64", "--validation_fraction=0.1"]))
    bad = args.work_dir / "data_corrupted"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(clean, bad)
    corrupt(bad, args.corrupt_first, args.corrupt_blocks)
    bad_steps = range(args.corrupt_first // 4 + 1, (args.corrupt_first + args.corrupt_blocks - 1) // 4 + 2)

    settings = {"model_overrides": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2},
                "max_steps": args.max_steps, "save_steps": 5, "save_total_limit": 20, "warmup_steps": 2,
                "logging_steps": 1, "eval_strategy": "no", "per_device_train_batch_size": 4,
                "train_sampling_strategy": "sequential", "disable_tqdm": True, "report_to": "none"}
    spikes = {"loss_spike_zscore": 5.0, "loss_spike_window": 10, "loss_spike_skip_ahead": 4}
    arms = {"clean data": (clean, {}), "bad data, no spike handling": (bad, {}),
            "bad data, loss_spike_zscore 5": (bad, spikes)}
    rows = []
    for name, (data_dir, extra) in arms.items():
        out = args.work_dir / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        if pretrain_recipe.main(config=NANO_CPU, overrides={**settings, **extra, "data_dir": str(data_dir),
                                                            "output_dir": str(out)}) != 0:
            raise SystemExit(f"{name}: pretraining failed")
        state = json.loads((out / "trainer_state.json").read_text())
        losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
        rollbacks = json.loads((out / f"checkpoint-{args.max_steps}" / "data_state.json").read_text())["rollbacks"] \
            if (out / f"checkpoint-{args.max_steps}" / "data_state.json").is_file() else []
        rows.append({"arm": name, "max_loss_bad_steps": max(losses[s] for s in bad_steps),
                     "loss_before_bad_steps": losses[bad_steps[0] - 1],
                     "mean_loss_last_5": sum(losses[s] for s in range(args.max_steps - 4, args.max_steps + 1)) / 5,
                     "eval_loss": json.loads((out / "all_results.json").read_text())["eval_loss"],
                     "rollbacks": rollbacks, "losses": losses})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)

    record = {"benchmark": "loss_spike", "command": " ".join([sys.executable, *sys.argv]),
              "machine": {"cpu": cpu_model_name(), "cores": available_cores(), "torch": torch.__version__},
              "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
              "bad_blocks": [args.corrupt_first, args.corrupt_first + args.corrupt_blocks],
              "bad_steps": [bad_steps[0], bad_steps[-1]], "settings": settings, "spike_settings": spikes,
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| arm | loss before the bad steps | largest loss over them | mean loss, last 5 steps | "
             "validation loss | rollbacks |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['loss_before_bad_steps']:.3f} | {r['max_loss_bad_steps']:.3f} | "
              f"{r['mean_loss_last_5']:.3f} | {r['eval_loss']:.3f} | "
              + ("; ".join(f"spike at step {e['spike_step']} (z {e['zscore']:.0f}), back to step "
                           f"{e['resumed_from_step']}, blocks {e['skipped_blocks']} skipped" for e in r["rollbacks"])
                 or "-") + " |" for r in rows]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
