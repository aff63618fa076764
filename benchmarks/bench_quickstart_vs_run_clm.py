"""Held-out bits per byte: Ember's quickstart pretraining vs run_clm-style stock Llama, same data, same wall time.

    python recipes/quickstart.py                                  # first: data, Ember model, its bits/byte
    python benchmarks/bench_quickstart_vs_run_clm.py [--quickstart_dir outputs/quickstart]

The baseline is what transformers' `examples/pytorch/language-modeling/run_clm.py` does with its
defaults, written out here (nothing is downloaded): the training documents tokenized with
`datasets.map`, concatenated and cut into blocks (`group_texts`, no separator between documents),
a stock `LlamaForCausalLM` of the same shape as Ember's model (`modeling.convert.ember_config_to_hf`),
and the Trainer's defaults (AdamW lr 5e-5, betas 0.9/0.999, no weight decay, no warmup, linear decay to
zero, batch 8), with `max_steps` set as a user with a time budget would.
Each baseline sees as many tokens as Ember did, with a cap at 1.05x Ember's training time.
A third row, `llama + ember recipe`, trains the stock model on Ember's packed shards with Ember's recipe
settings for the same time, to separate what the recipe brings from what the model code brings.
Every model is scored by `evaluation.perplexity` on the same held-out documents with the same windows.
Results: benchmarks/results/quickstart_vs_run_clm.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from itertools import chain
from pathlib import Path

import datasets
import torch
import transformers
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.documents import read_documents  # noqa: E402
from data_prep.token_dataset import PackedDataset  # noqa: E402
from evaluation.perplexity import evaluate_path  # noqa: E402
from modeling import EmberForCausalLM  # noqa: E402
from modeling.convert import ember_config_to_hf  # noqa: E402
from training.trainer import PretrainingTrainer, collate_packed  # noqa: E402


class WallClockStop(TrainerCallback):
    """Stops training once `seconds` of training (from the first step on) have passed."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def run_clm_blocks(data_dir: Path, tokenizer, block_size: int) -> datasets.Dataset:
    """run_clm's preprocessing: tokenize each document, concatenate everything, cut into blocks."""
    raw = datasets.Dataset.from_dict({"text": list(read_documents(data_dir / "documents" / "train"))})
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True, batch_size=1000)


def train_for(model, trainer_class, dataset, collator, seconds: float, out: Path, **settings) -> dict:
    """Train for `max_steps` (so the schedule runs its course), stopping early if `seconds` run out."""
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none",
                             save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0, **settings)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator,
                            callbacks=[WallClockStop(seconds)])
    result = trainer.train()
    return {"steps": trainer.state.global_step, "seconds": result.metrics["train_runtime"],
            "train_loss": result.metrics["train_loss"],
            "tokens": trainer.state.global_step * args.per_device_train_batch_size * len(dataset[0]["input_ids"])}


def held_out(model, tokenizer, data_dir: Path, stage: dict) -> dict:
    model.eval()
    with torch.no_grad():
        result = evaluate_path(model, tokenizer, data_dir / "documents" / "validation", window=stage["window"],
                               stride=stage["stride"], batch_size=4, max_documents=stage["num_documents"],
                               progress=False)
    return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart_dir", default=str(REPO_ROOT / "outputs" / "quickstart"))
    parser.add_argument("--seconds", type=float, help="training time per baseline (default: Ember's train_runtime)")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "quickstart_vs_run_clm"))
    args = parser.parse_args(argv)
    quickstart = Path(args.quickstart_dir)
    data_dir, ember_dir = quickstart / "data", quickstart / "pretrain"
    stages = quickstart / "stages"
    if not (stages / "perplexity.json").is_file():
        print(f"error: {stages / 'perplexity.json'}: run recipes/quickstart.py first", file=sys.stderr)
        return 2
    ember_eval = json.loads((stages / "perplexity.json").read_text())["pretrained"]
    ember_metrics = json.loads((ember_dir / "all_results.json").read_text())
    ember_state = json.loads((ember_dir / "trainer_state.json").read_text())
    seconds = args.seconds or ember_metrics["train_runtime"]
    budget = 1.05 * seconds  # a cap; the step counts below normally end each run first
    ember = EmberForCausalLM.from_pretrained(ember_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ember_dir)
    seq_len = PackedDataset(data_dir / "tokens" / "train").seq_len
    work = quickstart / "baselines"
    rows = [{"name": "ember (quickstart)", "seconds": ember_metrics["train_runtime"],
             "steps": ember_state["global_step"], "train_loss": ember_metrics["train_loss"],
             "bits_per_byte": ember_eval["bits_per_byte"], "perplexity": ember_eval["perplexity"]}]

    # run_clm defaults with a stock Llama of the same shape.
    torch.manual_seed(0)
    llama = LlamaForCausalLM(ember_config_to_hf(ember.config))
    assert sum(p.numel() for p in llama.parameters()) == sum(p.numel() for p in ember.parameters())
    blocks = run_clm_blocks(data_dir, tokenizer, seq_len)
    # As many tokens as Ember saw (which takes about as long: the two models run at the same speed, see
    # benchmarks/results/model_cpu.md), so the linear schedule decays to zero as a user's --max_steps would.
    ember_tokens = ember_state["global_step"] * ember_state["train_batch_size"] * seq_len
    trained = train_for(llama, Trainer, blocks, transformers.default_data_collator, budget, work / "run_clm",
                        per_device_train_batch_size=8, max_steps=max(1, round(ember_tokens / (8 * seq_len))))
    rows.append({"name": "llama + run_clm defaults", **trained, **_eval_row(llama, tokenizer, data_dir, ember_eval)})

    # The same stock model with Ember's recipe (packed shards, document positions, lr, schedule, betas, decay).
    torch.manual_seed(0)
    llama = LlamaForCausalLM(ember_config_to_hf(ember.config))
    recipe = torch.load(ember_dir / "training_args.bin", weights_only=False)  # Ember's TrainingArguments
    shards = PackedDataset(data_dir / "tokens" / "train", return_position_ids=True)
    # The schedule must end where Ember's did: the steps Ember took in the same time.
    trained = train_for(llama, PretrainingTrainer, shards, collate_packed, budget, work / "ember_recipe",
                        per_device_train_batch_size=recipe.per_device_train_batch_size,
                        learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
                        adam_beta1=recipe.adam_beta1, adam_beta2=recipe.adam_beta2, warmup_steps=recipe.warmup_steps,
                        max_grad_norm=recipe.max_grad_norm, lr_scheduler_type=recipe.lr_scheduler_type,
                        lr_scheduler_kwargs=recipe.lr_scheduler_kwargs, remove_unused_columns=False,
                        max_steps=ember_state["global_step"])
    rows.append({"name": "llama + ember recipe", **trained, **_eval_row(llama, tokenizer, data_dir, ember_eval)})

    baseline = rows[1]["bits_per_byte"]
    for row in rows:
        row["bpb_vs_run_clm"] = row["bits_per_byte"] / baseline
    report = {"machine": f"{cpu_model_name()}, {available_cores()} cores", "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__, "command": " ".join(sys.argv),
              "seconds_per_run": seconds, "held_out": {k: ember_eval[k] for k in ("window", "stride", "num_documents",
                                                                                   "num_tokens", "num_bytes")},
              "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':28s} {'seconds':>8s} {'steps':>6s} {'train loss':>10s} {'bits/byte':>9s} {'vs run_clm':>10s}")
    for row in rows:
        print(f"{row['name']:28s} {row['seconds']:8.0f} {row['steps']:6d} {row['train_loss']:10.3f} "
              f"{row['bits_per_byte']:9.3f} {row['bpb_vs_run_clm']:10.3f}")
    return 0


def _eval_row(model, tokenizer, data_dir: Path, ember_eval: dict) -> dict:
    result = held_out(model, tokenizer, data_dir, ember_eval)
    return {"bits_per_byte": result["bits_per_byte"], "perplexity": result["perplexity"]}


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    sys.exit(main())
