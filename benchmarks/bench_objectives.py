"""Masked-LM pretraining of the nano encoder on the stdlib corpus, then finetuning it as a classifier, on CPU.

    python benchmarks/bench_objectives.py --screen      # first: the masking-rate / optimizer screen (short runs)
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
   random trunk of the same shape (`--from_scratch=true`), each at every learning rate of SWEEP: the two
   trunks are compared each at its best, next to the majority baseline.
6. length of run: `package` finetuned (at the pretrained trunk's best rate) from the run's earlier checkpoints.

`--screen` runs short pretraining runs (SCREEN_ARMS: the recipe at other masking rates, and with AdamW) and
scores each by its held-out masked-token loss at common masking rates and by `package` finetuned from it; the
full run keeps that table. Prints the numbers and writes the JSON (machine, commands, seconds, numbers, the
tail of each command's output) and a Markdown summary next to it.

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
from training.checkpoints import saved_step  # noqa: E402
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
KINDS = ("scratch", "pretrained")
# Each task's metric the trunks are compared on, and the finetuning learning rates swept for each trunk: a
# random trunk and a pretrained one need different rates, so each is compared at its best.
PRIMARY = {"package": "accuracy", "calls": "entity_f1"}
SWEEP = {"package": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), "calls": (5e-4, 1e-3, 2e-3, 4e-3)}
# The masking-rate screen (--screen): short runs of the recipe with one setting changed each.
SCREEN_STEPS, SCREEN_RATE, SCREEN_BLOCKS = 300, 2e-3, 256
SCREEN_ARMS = {
    "muon_mask0.3": ["--mask_rate=0.3"],
    "muon_mask0.15": ["--mask_rate=0.15"],
    "muon_mask0.45": ["--mask_rate=0.45"],
    "adamw_mask0.3": ["--mask_rate=0.3", "--optimizer=adamw", "--learning_rate=2e-3"],
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


def finetune(task: str, kind: str, learning_rate: float, force: bool, log: dict, trunk: Path = ENCODER,
             tag: str = "") -> dict:
    """Finetune `task` from `trunk` (kind "pretrained") or from a random trunk of its shape (kind "scratch") at
    `learning_rate`, with the task's recipe otherwise unchanged; its classifier_results.json."""
    name = f"{task}_{kind}{tag}_lr{learning_rate:g}"
    output = FINETUNE / f"bench_{name}"
    command = [PY, "recipes/finetune_classifier.py", "--config", FINETUNES[task], f"--output_dir={output}",
               f"--model_name_or_path={trunk}", f"--from_scratch={str(kind == 'scratch').lower()}",
               f"--learning_rate={learning_rate:g}"]
    run(f"finetune_{name}", command, output / "classifier_results.json", force, log)
    return json.loads((output / "classifier_results.json").read_text())


def sweep(force: bool, log: dict) -> dict:
    """Every task, both trunks, at each learning rate of SWEEP: {task: {kind: {rate: validation metrics}}}."""
    return {task: {kind: {f"{rate:g}": finetune(task, kind, rate, force, log)["validation"] for rate in rates}
                   for kind in KINDS}
            for task, rates in SWEEP.items()}


def best_rate(scores: dict, task: str) -> str:
    """The learning rate of a trunk's sweep with the best primary metric."""
    return max(scores, key=lambda rate: scores[rate][PRIMARY[task]])


def run_length(report: dict, force: bool) -> dict:
    """`package` finetuned, at the pretrained trunk's best rate, from the run's earlier checkpoints: what the
    pretraining's length buys."""
    rate = best_rate(report["lr_sweep"]["package"]["pretrained"], "package")
    final = saved_step(ENCODER)
    numbers = {str(final): report["lr_sweep"]["package"]["pretrained"][rate]}  # the final model: in the sweep
    for checkpoint in ENCODER.glob("checkpoint-*"):
        steps = saved_step(checkpoint)
        if steps != final:
            numbers[str(steps)] = finetune("package", "pretrained", float(rate), force, report["stages"],
                                           trunk=checkpoint, tag=f"_at{steps}")["validation"]
    numbers = dict(sorted(numbers.items(), key=lambda item: int(item[0])))
    return {"learning_rate": float(rate), "accuracy_by_steps": {steps: v["accuracy"] for steps, v in numbers.items()},
            "validation": numbers}


def mask_screen(force: bool, log: dict) -> dict:
    """Short runs of the recipe (SCREEN_STEPS) at other masking rates, and with AdamW: their masked-token loss at
    common evaluation rates, and `package` finetuned from each at SCREEN_RATE."""
    tokenizer = load_tokenizer(DATA / "tokenizer")
    validation = PackedDataset(DATA / "tokens" / "validation", return_position_ids=True)
    arms = {}
    for name, overrides in SCREEN_ARMS.items():
        output = OUTPUTS / "pretrain" / "encoder_screen" / name
        command = [PY, "recipes/pretrain.py", "--config", "recipes/configs/pretrain_encoder_nano_cpu.yaml",
                   f"--output_dir={output}", f"--max_steps={SCREEN_STEPS}", f"--warmup_steps={SCREEN_STEPS // 20}",
                   "--eval_strategy=no", f"--save_steps={SCREEN_STEPS}", "--save_total_limit=1", *overrides]
        run(f"screen_{name}", command, output / "model.safetensors", force, log)
        model = EmberForMaskedLM.from_pretrained(output)
        masked = {f"{rate:g}": objective_metrics(model, validation, MaskedLMCollator(tokenizer, mask_rate=rate),
                                                 batch_size=16, max_blocks=SCREEN_BLOCKS)
                  for rate in (0.15, 0.3)}
        package = finetune("package", "pretrained", SCREEN_RATE, force, log, trunk=output, tag=f"_{name}")
        arms[name] = {"overrides": overrides, "masked": masked, "package": package["validation"]}
        print(f"[bench] screen {name}: {json.dumps(arms[name])}", flush=True)
    return {"steps": SCREEN_STEPS, "package_learning_rate": SCREEN_RATE, "blocks": SCREEN_BLOCKS, "arms": arms}


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
        "## Finetuning (recipes/finetune_classifier.py), each trunk at its best learning rate", "",
        "Each task's recipe with only `learning_rate` changed, over "
        + "; ".join(f"{task} " + ", ".join(f"{rate:g}" for rate in rates) for task, rates in SWEEP.items())
        + " for both trunks (the full sweep is below); the random trunk has the pretrained encoder's shape "
        "(`--from_scratch=true`). Scores on the validation split.", "",
        "| task | metric | majority baseline | random trunk (best lr) | pretrained encoder (best lr) "
        "| pretrained - random |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task in SWEEP:
        key = PRIMARY[task]
        (s_rate, scratch), (p_rate, pretrained) = best(report, task, "scratch"), best(report, task, "pretrained")
        keys = (key, "macro_f1") if task == "package" else (key,)
        for metric in keys:
            rows.append(f"| {task} | {metric} | {report['majority_baseline'][task][metric]:.3f} | "
                        f"{scratch[metric]:.3f} ({s_rate}) | {pretrained[metric]:.3f} ({p_rate}) | "
                        f"{pretrained[metric] - scratch[metric]:+.3f} |")
    rows += ["", "Pretraining pays off on both tasks." if pretraining_wins(report) else
             "Pretraining does not pay off on both tasks.", ""]
    rows += sweep_markdown(report)
    if "run_length" in report:
        length = report["run_length"]
        rows += ["## Length of the pretraining run", "",
                 f"`package` accuracy finetuned (lr {length['learning_rate']:g}) from the run's checkpoints: "
                 + ", ".join(f"{int(steps):,} steps {accuracy:.3f}"
                             for steps, accuracy in length["accuracy_by_steps"].items())
                 + f"; random trunk at its best {best(report, 'package', 'scratch')[1]['accuracy']:.3f}.", ""]
    if "mask_screen" in report:
        rows += screen_markdown(report)
    rows += ["Stage wall times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in report["stages"].items()
                                                  if "seconds" in v), ""]
    if "diagnosis" in report:
        rows += diagnosis_markdown(report)
    return "\n".join(rows)


def best(report: dict, task: str, kind: str) -> tuple[str, dict]:
    """(learning rate, validation metrics) of a trunk's best finetuning run on a task."""
    scores = report["lr_sweep"][task][kind]
    rate = best_rate(scores, task)
    return rate, scores[rate]


def sweep_markdown(report: dict) -> list[str]:
    rows = ["## The learning-rate sweep", "",
            "Validation " + ", ".join(f"{task}: {PRIMARY[task]}" for task in SWEEP) + ".", ""]
    for task, rates in SWEEP.items():
        rows += [f"| {task} | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |",
                 "| --- |" + " --- |" * len(rates),
                 *(f"| {label} | " + " | ".join(f"{report['lr_sweep'][task][kind][f'{rate:g}'][PRIMARY[task]]:.3f}"
                                                for rate in rates) + " |"
                   for kind, label in (("scratch", "random trunk"), ("pretrained", "pretrained encoder"))), ""]
    return rows


def screen_markdown(report: dict) -> list[str]:
    screen = report["mask_screen"]
    return [
        "## Masking rate and optimizer: short runs", "",
        f"The recipe for {screen['steps']} steps with one setting changed; held-out masked-token loss on "
        f"{screen['blocks']} validation blocks masked at 15% and at 30% (fixed masks), and `package` accuracy "
        f"finetuned from each at lr {screen['package_learning_rate']:g}.", "",
        "| run | settings | loss, 15% masked | loss, 30% masked | package accuracy |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {name} | {' '.join(arm['overrides'])} | {arm['masked']['0.15']['loss']:.3f} | "
          f"{arm['masked']['0.3']['loss']:.3f} | {arm['package']['accuracy']:.3f} |"
          for name, arm in screen["arms"].items()), "",
    ]


def pretraining_wins(report: dict) -> bool:
    """Whether the pretrained encoder, at its best learning rate, finetunes better than the random trunk at its
    best on every task's primary metric."""
    return all(best(report, task, "pretrained")[1][PRIMARY[task]] > best(report, task, "scratch")[1][PRIMARY[task]]
               for task in SWEEP)


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
    compared = [f"{task} {PRIMARY[task]} {best(report, task, 'pretrained')[1][PRIMARY[task]]:.3f} against "
                f"{best(report, task, 'scratch')[1][PRIMARY[task]]:.3f}" for task in SWEEP]
    rows.append("Each at its best finetuning learning rate, the pretrained encoder against a random trunk of the same "
                f"shape: {'; '.join(compared)}.")
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
    parser.add_argument("--screen", action="store_true", help="run the masking-rate / optimizer screen (short "
                        "runs) into --output; the full run keeps it")
    args = parser.parse_args(argv)
    output = Path(args.output)
    earlier = json.loads(output.read_text()) if output.is_file() else {}
    if args.screen:
        earlier["mask_screen"] = mask_screen(args.force, earlier.setdefault("stages", {}))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(earlier, indent=2) + "\n")
        print("\n".join(screen_markdown(earlier)))
        return 0
    if args.diagnose:
        report = earlier
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
    report = {
        "command": " ".join(["python", "benchmarks/bench_objectives.py", *(sys.argv[1:] if argv is None else argv)]),
        "stages": stages, "held_out": held, "lr_sweep": sweep(args.force, stages),
        "majority_baseline": {task: json.loads((FINETUNE / f"bench_{task}_scratch_lr{SWEEP[task][0]:g}"
                                                / "classifier_results.json").read_text())["majority_baseline"]
                              for task in SWEEP},
        "tasks": json.loads((TASKS / "report.json").read_text()),
    }
    report["run_length"] = run_length(report, args.force)
    if "mask_screen" in earlier:  # from an earlier --screen
        report["mask_screen"] = earlier["mask_screen"]
    for name, value in earlier.get("stages", {}).items():  # a stage skipped now keeps the time it took then
        if "seconds" in value and stages.get(name, {"skipped": True}).get("skipped"):
            stages[name] = value
    report["machine"] = {"platform": platform.platform(), "cpu": cpu_model_name(), "cores": available_cores(),
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "load_average_start": load_at_start, "load_average_end": os.getloadavg()}
    return save(report, output)


if __name__ == "__main__":
    sys.exit(main())
