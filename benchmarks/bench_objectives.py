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

adds, to an existing JSON, why the pretrained encoder finetunes as it does: the held-out tokens' cross-entropy
under the training split's unigram distribution (what a model that reads no context scores), the effective rank
of the encoder's hidden states layer by layer and of its pooled text vectors, trained vs untrained, and the
`package` finetuning again with mean pooling (`classifier_pooling: mean`) for both trunks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402

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
    from data_prep.token_dataset import PackedDataset
    from data_prep.tokenizer import load_tokenizer
    from evaluation.objectives import objective_metrics, pseudo_perplexity
    from modeling import EmberForMaskedLM
    from training.objectives import MaskedLMCollator

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


def finetune(task: str, from_scratch: bool, force: bool, log: dict) -> dict:
    name = f"{task}_{'scratch' if from_scratch else 'pretrained'}"
    output = FINETUNE / f"bench_{name}"
    command = [PY, "recipes/finetune_classifier.py", "--config", FINETUNES[task], f"--output_dir={output}",
               f"--from_scratch={str(from_scratch).lower()}"]
    run(f"finetune_{name}", command, output / "classifier_results.json", force, log)
    return json.loads((output / "classifier_results.json").read_text())


def effective_rank(states: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred (n, d) states: how many directions
    they really use (Roy and Vetterli 2007)."""
    values = torch.linalg.svdvals(states - states.mean(0))
    share = values.square() / values.square().sum()
    return float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))


def diagnose(force: bool, log: dict) -> dict:
    """Unigram cross-entropy, effective ranks of the trained and untrained encoder, mean-pooled finetuning."""
    import math
    from collections import Counter

    from data_prep.token_dataset import PackedDataset
    from modeling.loading import checkpoint_tokenizer, load_model

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
    mean_pooled = {}
    for kind in ("scratch", "pretrained"):
        output = FINETUNE / f"bench_package_{kind}_mean"
        command = [PY, "recipes/finetune_classifier.py", "--config", FINETUNES["package"], f"--output_dir={output}",
                   f"--from_scratch={str(kind == 'scratch').lower()}", "--classifier_pooling=mean"]
        run(f"finetune_package_{kind}_mean", command, output / "classifier_results.json", force, log)
        result = json.loads((output / "classifier_results.json").read_text())
        mean_pooled[kind] = {key: result["validation"][key] for key in ("accuracy", "macro_f1")}
    return {"unigram_cross_entropy": unigram, "hidden_size": model.config.hidden_size, "effective_rank": ranks,
            "tie_word_embeddings": model.config.tie_word_embeddings,
            "package_mean_pooling": mean_pooled}


def markdown(report: dict) -> str:
    held = report["held_out"]
    u, t = held["untrained"], held["trained"]
    rows = [
        "# Objectives on CPU: masked-LM encoder and classifier finetuning", "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), torch "
        f"{report['machine']['torch']}, transformers {report['machine']['transformers']}. "
        f"Command: `{report['command']}`. Load average (1/5/15 min) at the start "
        f"{'/'.join(f'{x:.1f}' for x in report['machine']['load_average_start'])}, at the end "
        f"{'/'.join(f'{x:.1f}' for x in report['machine']['load_average_end'])}: the wall times below are those of "
        "a shared machine; the losses and scores do not depend on it.", "",
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
    if "diagnosis" in report:
        rows += diagnosis_markdown(report)
    return "\n".join(rows)


def diagnosis_markdown(report: dict) -> list[str]:
    d = report["diagnosis"]
    ranks, masked = d["effective_rank"], report["held_out"]["trained"]["masked"]["loss"]
    scores = d["package_mean_pooling"]
    finetune = report["finetune"]
    return [
        "## Why the pretrained encoder finetunes worse than a random trunk", "",
        "Command: `python benchmarks/bench_objectives.py --diagnose` (on the same outputs).", "",
        "- The weights load: the classifier built from the pretrained folder (`modeling.loading.load_model`, "
        "`head=sequence_classification` / `token_classification`) reads every trunk tensor from it unchanged; only "
        "`score` is new (tests/test_encoder_heads.py checks this).",
        f"- The pretraining is far too short to give contextual features. Its held-out masked-token loss, "
        f"{masked:.3f} nats, is only {d['unigram_cross_entropy'] - masked:.2f} nats below the "
        f"{d['unigram_cross_entropy']:.3f} nats of the training split's unigram distribution, a model that reads no "
        "context; the run saw 0.6 M tokens (300 steps of 2,048).",
        "- In that phase the encoder's states have collapsed onto a few directions, the ones that predict frequent "
        f"tokens. Effective rank of the hidden states (of {d['hidden_size']} dimensions; 16 validation blocks; "
        "embeddings, then each layer):", "",
        "| encoder | per layer | mean-pooled texts | last (EOS) token of texts |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {' / '.join(str(r) for r in ranks[name]['layers'])} | {ranks[name]['mean_pooled']} | "
          f"{ranks[name]['last_pooled']} |" for name in ("untrained", "trained")), "",
        *(["  Already the token embeddings have collapsed: the nano preset ties the masked-LM head to them, so "
           "learning token frequencies shapes the input embeddings as well.", ""] if d["tie_word_embeddings"] else []),
        "  A finetuning of 120-150 steps at these learning rates has to reopen those directions first; the random "
        "trunk starts from well-spread features, and both are trained end to end, so the random trunk wins.",
        "- Pooling adds to it for `package`: the table above used the last (EOS) token, as the sequence head then "
        "did for every trunk. A masked-LM encoder never predicts at EOS, so nothing in its pretraining gives that "
        "token a summary of the text. Encoders now pool by the mean (`classifier_pooling`, default `mean` when "
        "`is_causal: false`). With mean pooling, `package` accuracy is "
        f"{scores['pretrained']['accuracy']:.3f} from the pretrained encoder (was "
        f"{finetune['package_pretrained']['validation']['accuracy']:.3f}) and {scores['scratch']['accuracy']:.3f} "
        f"from the random trunk (was {finetune['package_scratch']['validation']['accuracy']:.3f}): better, still "
        "behind.", "",
        "So the recipe works as built, and the comparison says how little 0.6 M tokens of masked-LM pretraining "
        "teach a 6-layer encoder, not that pretraining hurts: a pretraining run long enough to bring the masked-token "
        "loss well below the unigram cross-entropy is what should make the pretrained row win.", "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "objectives_cpu.json"))
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    parser.add_argument("--diagnose", action="store_true", help="add the diagnosis to an existing --output JSON")
    args = parser.parse_args(argv)
    if args.diagnose:
        output = Path(args.output)
        report = json.loads(output.read_text())
        report["diagnosis"] = diagnose(args.force, report["stages"])
        report["diagnosis"]["load_average"] = os.getloadavg()
        output.write_text(json.dumps(report, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
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
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
