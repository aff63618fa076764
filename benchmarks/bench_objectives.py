"""Masked-LM pretraining of the nano encoder on the stdlib corpus, then finetuning it as a classifier, on CPU.

    python benchmarks/bench_objectives.py [--output benchmarks/results/objectives_cpu.json] [--force]

Stages, each run with the repository's own commands (skipped when its output exists, unless --force):

1. data: `python -m data_prep run` on recipes/configs/data/stdlib.yaml with a mask token, seq_len 256
   (outputs/data/stdlib_mlm).
2. pretraining: recipes/pretrain.py with recipes/configs/pretrain_encoder_nano_cpu.yaml.
3. held-out: masked-token loss and accuracy on the validation blocks (`evaluation.objectives`, 30% masked with
   a fixed seed, the same masks for both models) and pseudo-perplexity on the first blocks, for the trained
   encoder and for the untrained one it started from (same config, same seed).
4. tasks: `python -m data_prep.tasks` (outputs/tasks/stdlib).
5. finetuning: recipes/finetune_classifier.py with classify_package_nano_cpu.yaml (full) and
   tag_calls_nano_cpu.yaml (LoRA), from the pretrained encoder and, as the "no pretraining" row, from a
   random trunk of the same shape (`--from_scratch=true`), against the majority baseline.

Prints the numbers and writes the JSON (machine, commands, seconds, numbers, the tail of each command's
output) and a Markdown summary next to it.

    python benchmarks/bench_objectives.py --diagnose

adds, to an existing JSON, what the pretraining gave the encoder: the held-out tokens' cross-entropy under the
training split's unigram distribution (what a model that reads no context scores) next to its masked-token loss,
and the effective rank of its hidden states layer by layer and of its pooled text vectors, trained vs untrained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.token_dataset import PackedDataset  # noqa: E402
from data_prep.tokenizer import load_tokenizer  # noqa: E402
from evaluation.objectives import objective_metrics, pseudo_perplexity  # noqa: E402
from modeling import EmberForMaskedLM  # noqa: E402
from modeling.loading import checkpoint_tokenizer, load_model  # noqa: E402
from training.objectives import MaskedLMCollator  # noqa: E402
from training.plan import RunPlan  # noqa: E402

OUTPUTS = REPO_ROOT / "outputs"
DATA = OUTPUTS / "data" / "stdlib_mlm"
ENCODER = OUTPUTS / "pretrain" / "encoder_nano_cpu"
TASKS = OUTPUTS / "tasks" / "stdlib"
FINETUNE = OUTPUTS / "finetune"
PY = sys.executable
STAGES = {
    "data": ([PY, "-m", "data_prep", "run", "--config", "recipes/configs/data/stdlib.yaml", "--workers=2",
              f"--output_dir={DATA}", "--tokenizer.mask_token=true", "--pack.seq_len=256"], DATA / "tokens"),
    "pretrain": ([PY, "recipes/pretrain.py", "--config", "recipes/configs/pretrain_encoder_nano_cpu.yaml"],
                 ENCODER / "model.safetensors"),
    "tasks": ([PY, "-m", "data_prep.tasks", f"--output={TASKS}"], TASKS / "report.json"),
}
FINETUNES = {
    "package": "recipes/configs/classify_package_nano_cpu.yaml",
    "calls": "recipes/configs/tag_calls_nano_cpu.yaml",
}


def run(name: str, command: list[str], done: Path, force: bool, log: dict) -> None:
    if done.exists() and not force:
        print(f"[bench] {name}: {done} exists, skipped")
        log[name] = {"command": " ".join(command), "skipped": True}
        return
    print(f"[bench] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    log[name] = {"command": " ".join(command), "seconds": round(seconds, 1), "returncode": result.returncode,
                 "output_tail": (result.stdout + result.stderr)[-2000:]}
    if result.returncode != 0:
        raise SystemExit(f"[bench] {name} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    print(f"[bench] {name}: {seconds:.0f} s", flush=True)


def held_out() -> dict:
    """Masked-token loss / accuracy and pseudo-perplexity of the untrained and the trained encoder."""
    tokenizer = load_tokenizer(ENCODER)
    validation = PackedDataset(DATA / "tokens" / "validation", return_position_ids=True)
    trained = EmberForMaskedLM.from_pretrained(ENCODER)
    torch.manual_seed(0)  # the recipe's seed: the weights the run started from
    untrained = EmberForMaskedLM._from_config(trained.config)
    numbers = {"validation_blocks": len(validation), "mask_rate": 0.3}
    for name, model in (("untrained", untrained), ("trained", trained)):
        numbers[name] = {
            "masked": objective_metrics(model, validation, MaskedLMCollator(tokenizer, mask_rate=0.3), batch_size=16),
            "pseudo": pseudo_perplexity(model, validation, tokenizer.mask_token_id, tokenizer.all_special_ids,
                                        max_blocks=2, batch_size=32),
        }
    return numbers


def finetune(task: str, from_scratch: bool, force: bool, log: dict, learning_rate: float | None = None) -> dict:
    name = f"{task}_{'scratch' if from_scratch else 'pretrained'}" + (f"_lr{learning_rate:g}" if learning_rate else "")
    output = FINETUNE / f"bench_{name}"
    command = [PY, "recipes/finetune_classifier.py", "--config", FINETUNES[task], f"--output_dir={output}",
               f"--from_scratch={str(from_scratch).lower()}"]
    if learning_rate:
        command.append(f"--learning_rate={learning_rate:g}")
    run(f"finetune_{name}", command, output / "classifier_results.json", force, log)
    return json.loads((output / "classifier_results.json").read_text())


def effective_rank(states: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred (n, d) states: how many directions
    they really use (Roy and Vetterli 2007)."""
    values = torch.linalg.svdvals(states - states.mean(0))
    share = values.square() / values.square().sum()
    return float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))


def diagnose() -> dict:
    """Unigram cross-entropy, tokens the pretraining saw, effective ranks of the trained and untrained encoder."""
    tokenizer = checkpoint_tokenizer(ENCODER)
    special = set(tokenizer.all_special_ids)
    counts = {}
    for split in ("train", "validation"):
        blocks = PackedDataset(DATA / "tokens" / split, return_position_ids=True)
        counts[split] = Counter(t for i in range(len(blocks)) for t in blocks[i]["input_ids"].tolist()
                                if t not in special)
    train_total, held_total = sum(counts["train"].values()), sum(counts["validation"].values())
    unigram = -sum(n * math.log((counts["train"][t] + 1) / (train_total + len(tokenizer)))  # add-one smoothing
                   for t, n in counts["validation"].items()) / held_total

    validation = PackedDataset(DATA / "tokens" / "validation", return_position_ids=True)
    rows = [validation[i] for i in range(16)]
    texts = [json.loads(line)["text"] for line in (TASKS / "package" / "validation.jsonl").read_text().splitlines()]
    ranks = {}
    torch.manual_seed(0)  # the recipe's seed: the weights the run started from
    for name, weights in (("untrained", False), ("trained", True)):
        model = load_model(ENCODER, head="masked_lm", weights=weights)
        with torch.no_grad():
            states = model.model(input_ids=torch.stack([r["input_ids"] for r in rows]),
                                 position_ids=torch.stack([r["position_ids"] for r in rows]),
                                 output_hidden_states=True).hidden_states
            pooled = {"mean": [], "last": []}
            for text in texts[:96]:  # as SequenceDataset encodes them: the text, then EOS
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][:127] + [tokenizer.eos_token_id]
                hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                pooled["mean"].append(hidden.mean(0))
                pooled["last"].append(hidden[-1])
        ranks[name] = {"layers": [round(effective_rank(h.reshape(-1, h.shape[-1])), 1) for h in states],
                       **{f"{kind}_pooled": round(effective_rank(torch.stack(vectors)), 1)
                          for kind, vectors in pooled.items()}}
    state = json.loads((ENCODER / "trainer_state.json").read_text())
    plan = RunPlan(seq_len=len(validation[0]["input_ids"]), micro_batch_size=state["train_batch_size"],
                   accumulation=1, data_parallel=1, max_steps=state["global_step"])  # the encoder run's own settings
    return {"unigram_cross_entropy": unigram, "hidden_size": model.config.hidden_size, "effective_rank": ranks,
            "tie_word_embeddings": model.config.tie_word_embeddings, "pretrain_steps": state["global_step"],
            "pretrain_tokens": plan.total_tokens,
            "classifier_pooling": model.config.classifier_pooling}


def markdown(report: dict) -> str:
    held = report["held_out"]
    u, t = held["untrained"], held["trained"]
    rows = [
        "# Objectives on CPU: masked-LM encoder and classifier finetuning", "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), torch "
        f"{report['machine']['torch']}, transformers {report['machine']['transformers']}. "
        f"Command: `{report['command']}`. Load average (1/5/15 min) at the start "
        f"{'/'.join(f'{x:.1f}' for x in report['machine']['load_average_start'])}, at the end "
        f"{'/'.join(f'{x:.1f}' for x in report['machine']['load_average_end'])}: the wall times below depend on the "
        "load; the losses and scores do not.", "",
        "## Masked-LM pretraining (recipes/configs/pretrain_encoder_nano_cpu.yaml)", "",
        f"Held-out: {held['validation_blocks']} validation blocks of 256 tokens, {held['mask_rate']:.0%} of the tokens "
        "masked with a fixed seed (the same masks for both rows); pseudo-perplexity over the first 2 blocks.", "",
        "| encoder | masked-token loss (nats) | masked-token accuracy | pseudo-perplexity |",
        "| --- | --- | --- | --- |",
        f"| untrained (same config and seed) | {u['masked']['loss']:.3f} | {u['masked']['accuracy']:.3f} | "
        f"{u['pseudo']['pseudo_perplexity']:.1f} |",
        f"| after pretraining | {t['masked']['loss']:.3f} | {t['masked']['accuracy']:.3f} | "
        f"{t['pseudo']['pseudo_perplexity']:.1f} |", "",
        "## Finetuning (recipes/finetune_classifier.py)", "",
        "| task | metric | majority baseline | random trunk | pretrained encoder | margin over baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, key in (("package", "accuracy"), ("calls", "entity_f1")):
        scratch, pretrained = report["finetune"][f"{task}_scratch"], report["finetune"][f"{task}_pretrained"]
        rows.append(f"| {task} | {key} | {pretrained['majority_baseline'][key]:.3f} | "
                    f"{scratch['validation'][key]:.3f} | {pretrained['validation'][key]:.3f} | "
                    f"{pretrained['margin_over_baseline']:+.3f} |")
        if task == "package":
            rows.append(f"| package | macro_f1 | {pretrained['majority_baseline']['macro_f1']:.3f} | "
                        f"{scratch['validation']['macro_f1']:.3f} | {pretrained['validation']['macro_f1']:.3f} | "
                        f"{pretrained['validation']['macro_f1'] - pretrained['majority_baseline']['macro_f1']:+.3f} |")
    rows += ["", "Stage wall times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in report["stages"].items()
                                                      if "seconds" in v), ""]
    if "package_lr_sweep" in report:
        rows += sweep_markdown(report)
    if "diagnosis" in report:
        rows += diagnosis_markdown(report)
    return "\n".join(rows)


def sweep_markdown(report: dict) -> list[str]:
    sweep = report["package_lr_sweep"]
    rates = sorted(float(rate) for rate in sweep["scratch"])
    cell = {kind: {float(rate): scores for rate, scores in sweep[kind].items()} for kind in sweep}
    return [
        "## `package` at other finetuning learning rates", "",
        f"Command: `{report['package_lr_sweep_command']}`. The same recipe (`classify_package_nano_cpu.yaml`, "
        "full finetuning) with only `learning_rate` changed; accuracy / macro-F1 on the validation split.", "",
        "| trunk | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |",
        "| --- |" + " --- |" * len(rates),
        *(f"| {label} | " + " | ".join(f"{cell[kind][rate]['accuracy']:.3f} / {cell[kind][rate]['macro_f1']:.3f}"
                                       for rate in rates) + " |"
          for kind, label in (("scratch", "random trunk"), ("pretrained", "pretrained encoder"))), "",
    ]


# Each task's validation metrics the two trunks are compared on.
TASK_METRICS = (("calls", "entity_f1"), ("package", "accuracy"), ("package", "macro_f1"))


def pretraining_wins(report: dict) -> bool:
    """Whether the pretrained encoder finetunes better than the random trunk on every task metric."""
    finetune = report["finetune"]
    return all(finetune[f"{task}_pretrained"]["validation"][key] > finetune[f"{task}_scratch"]["validation"][key]
               for task, key in TASK_METRICS)


def diagnosis_markdown(report: dict) -> list[str]:
    d = report["diagnosis"]
    ranks, masked = d["effective_rank"], report["held_out"]["trained"]["masked"]["loss"]
    below_unigram = d["unigram_cross_entropy"] - masked
    rows = [
        "## What the pretraining gave the encoder", "",
        "Command: `python benchmarks/bench_objectives.py --diagnose` (on the same outputs).", "",
        f"- Context: the held-out masked-token loss, {masked:.3f} nats, is {below_unigram:.2f} nats below the "
        f"{d['unigram_cross_entropy']:.3f} nats of the training split's unigram distribution, a model that reads "
        f"no context; the run saw {d['pretrain_tokens'] / 1e6:.1f} M tokens ({d['pretrain_steps']:,} steps).",
        f"- Effective rank of the hidden states (of {d['hidden_size']} dimensions; 16 validation blocks; "
        "embeddings, then each layer) and of the pooled vectors of `package` texts:", "",
        "| encoder | per layer | mean-pooled texts | last (EOS) token of texts |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {' / '.join(str(r) for r in ranks[name]['layers'])} | {ranks[name]['mean_pooled']} | "
          f"{ranks[name]['last_pooled']} |" for name in ("untrained", "trained")), "",
        f"- The sequence head pools by the {d['classifier_pooling']} of the token states (`classifier_pooling`; "
        "the default for encoders: a masked-LM encoder never predicts at EOS, so nothing in its pretraining "
        "makes that token a summary of the text).", "",
    ]
    finetune = report["finetune"]
    compared = [f"{task} {key} {finetune[f'{task}_pretrained']['validation'][key]:.3f} against "
                f"{finetune[f'{task}_scratch']['validation'][key]:.3f}"
                for task, key in TASK_METRICS]
    rows.append("Finetuned with the same recipe and steps, the pretrained encoder against a random trunk of the same "
                f"shape: {'; '.join(compared)}.")
    if "package_lr_sweep" in report:
        best = {kind: max(scores.values(), key=lambda s: s["accuracy"])
                for kind, scores in report["package_lr_sweep"].items()}
        rows.append(f"At the best learning rate of the sweep above, `package` accuracy is "
                    f"{best['pretrained']['accuracy']:.3f} pretrained against "
                    f"{best['scratch']['accuracy']:.3f} random.")
    if pretraining_wins(report):
        rows.append("Pretraining pays off on every task metric.")
    else:
        rows.append("Pretraining does not pay off on every task: where it loses, the finetuning has to reopen the "
                    "directions the pretraining concentrated the states on (the ranks above), while a random trunk "
                    "starts from well-spread features.")
    return rows + [""]


def save(report: dict, output: Path) -> int:
    """Write the JSON record and its Markdown summary next to it; print the summary."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "objectives_cpu.json"))
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    parser.add_argument("--diagnose", action="store_true", help="add the diagnosis to an existing --output JSON")
    parser.add_argument("--package_lrs", default="", help="add, to an existing --output JSON, the `package` "
                        "finetuning of both trunks at these comma-separated learning rates")
    args = parser.parse_args(argv)
    if args.package_lrs:
        output = Path(args.output)
        report = json.loads(output.read_text())
        sweep: dict = {"scratch": {}, "pretrained": {}}
        for rate in [float(r) for r in args.package_lrs.split(",")]:
            for kind in sweep:
                result = finetune("package", kind == "scratch", args.force, report["stages"], learning_rate=rate)
                sweep[kind][f"{rate:g}"] = {key: result["validation"][key] for key in ("accuracy", "macro_f1")}
        report["package_lr_sweep"] = sweep
        report["package_lr_sweep_command"] = " ".join(
            ["python", "benchmarks/bench_objectives.py", *(sys.argv[1:] if argv is None else argv)])
        return save(report, output)
    if args.diagnose:
        output = Path(args.output)
        report = json.loads(output.read_text())
        report["diagnosis"] = diagnose()
        report["diagnosis"]["load_average"] = os.getloadavg()
        return save(report, output)
    load_at_start = os.getloadavg()
    stages: dict = {}
    for name, (command, done) in STAGES.items():
        if name == "tasks":
            continue
        run(name, command, done, args.force, stages)
    held = held_out()
    print(json.dumps(held, indent=2))
    command, done = STAGES["tasks"]
    run("tasks", command, done, args.force, stages)
    results = {f"{task}_{kind}": finetune(task, kind == "scratch", args.force, stages)
               for task in FINETUNES for kind in ("scratch", "pretrained")}
    report = {
        "command": " ".join(["python", "benchmarks/bench_objectives.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpu": cpu_model_name(), "cores": available_cores(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_average_start": load_at_start, "load_average_end": os.getloadavg()},
        "stages": stages, "held_out": held,
        "finetune": {name: {key: result[key] for key in ("validation", "majority_baseline", "margin_over_baseline",
                                                         "train_examples", "validation_examples", "labels")}
                     for name, result in results.items()},
        "tasks": json.loads((TASKS / "report.json").read_text()),
    }
    return save(report, Path(args.output))


if __name__ == "__main__":
    sys.exit(main())
