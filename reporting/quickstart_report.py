"""The quickstart's final report: one Markdown page and one JSON file with every number the stages produced.

`write_quickstart_report(output_dir, results, ...)` takes the per-stage results of `recipes/quickstart.py`
(the JSON each stage leaves in `<output_dir>/stages/`) and writes `<output_dir>/report.md` (tables, the
pretraining plots, the generated samples) and `<output_dir>/results.json` (the headline numbers).
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import torch

from reporting.markdown import fmt_duration, fmt_number, md_table
from reporting.run_report import available_cores, cpu_model_name, draw_lines
from reporting.stages import STAGE_TITLES


def _machine() -> str:
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"{cpu_model_name()}, {available_cores()} cores")
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}"


def headline_numbers(results: dict[str, dict]) -> dict[str, Any]:
    """The numbers a reader looks for first, flat (also the content of results.json's "headline")."""
    data = results.get("data", {}).get("report", {})
    steps = {step["step"]: step for step in data.get("steps", [])}
    tokenizer = data.get("tokenizer_report", {})
    pretrain = results.get("pretrain", {})
    metrics = pretrain.get("metrics", {})
    held_out = results.get("perplexity", {})
    finetune = results.get("finetune", {}).get("metrics", {})
    instructions = results.get("instructions", {})
    return {
        "documents_read": steps.get("read", {}).get("docs_in"),
        "documents_kept": steps.get("split", {}).get("docs_out"),
        "train_tokens": data.get("tokens_train", {}).get("num_tokens"),
        "validation_documents": data.get("tokens_validation", {}).get("num_documents"),
        "tokenizer_bytes_per_token": tokenizer.get("bytes_per_token"),
        "pretrain_steps": pretrain.get("steps"),
        "pretrain_first_loss": pretrain.get("first_logged_loss"),
        "pretrain_last_loss": pretrain.get("last_logged_loss"),
        "pretrain_seconds": metrics.get("train_runtime"),
        "held_out_bpb_untrained": held_out.get("untrained", {}).get("bits_per_byte"),
        "held_out_bpb_pretrained": held_out.get("pretrained", {}).get("bits_per_byte"),
        "held_out_perplexity_pretrained": held_out.get("pretrained", {}).get("perplexity"),
        "held_out_tokens_scored": held_out.get("pretrained", {}).get("num_tokens"),
        "held_out_bpb_compressors": {name: r["bits_per_byte"] for name, r in held_out.get("compressors", {}).items()},
        "instruction_examples_train": instructions.get("train"),
        "instruction_examples_validation": instructions.get("validation"),
        "lora_examples_trained": finetune.get("data", {}).get("train", {}).get("examples"),
        "lora_examples_evaluated": finetune.get("data", {}).get("validation", {}).get("examples"),
        "lora_trainable_parameters": finetune.get("parameters", {}).get("trainable"),
        "lora_response_loss_before": finetune.get("eval_before", {}).get("loss"),
        "lora_response_loss_after": finetune.get("eval_after", {}).get("loss"),
    }


def _rows(numbers: dict[str, Any], keys: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(label, "-" if numbers.get(key) is None else fmt_number(numbers.get(key), spec))
            for key, label, spec in keys]


def _fenced(text: str) -> list[str]:
    """`text` as a fenced code block whose fence is longer than any backtick run in it: valid for any text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _lora_curve(output_dir: Path, finetune_dir: Path) -> Path | None:
    """A plot of the LoRA run's training loss, from the `trainer_state.json` it leaves; None without one."""
    state_file = finetune_dir / "trainer_state.json"
    if not state_file.is_file():
        return None
    logs = [entry for entry in json.loads(state_file.read_text()).get("log_history", []) if "loss" in entry]
    if not logs:
        return None
    path = output_dir / "lora_loss.png"
    draw_lines(path, "LoRA finetuning loss (response tokens)", "cross-entropy (nats/token)",
               [("train", [entry["step"] for entry in logs], [entry["loss"] for entry in logs])])
    return path


def _hyperparameters(results: dict[str, dict]) -> list[str]:
    """The settings of the pretraining and finetuning runs, as recorded in their outputs."""
    rows = []
    for stage, source in (("pretrain", results.get("pretrain", {}).get("config", {})),
                          ("finetune", results.get("finetune", {}).get("metrics", {}).get("config", {}))):
        rows += [(stage, key, value) for key, value in source.items()]
    if not rows:
        return ["Not recorded."]
    return md_table(("stage", "key", "value"), rows)


def write_quickstart_report(output_dir: str | Path, results: dict[str, dict], *, pretrain_dir: str | Path,
                            wall_seconds: float, probe_step_seconds: float | None = None,
                            estimated_seconds: dict[str, float] | None = None,
                            corrected_seconds: dict[str, float] | None = None) -> Path:
    """Write report.md and results.json under `output_dir`; returns the report's path. `estimated_seconds`: the
    plan's estimate per stage (from the probe before the run), `corrected_seconds`: pretraining's and the later
    stages' once pretraining has timed its first steps; both set against each stage's measured time (how honest the
    plan was)."""
    output_dir, pretrain_dir = Path(output_dir), Path(pretrain_dir)
    finetune_dir = Path(results.get("finetune", {}).get("output_dir", output_dir / "finetune"))
    numbers = headline_numbers(results)
    stage_seconds = {name: results[name].get("seconds") for name in STAGE_TITLES if name in results}
    lines = ["# Ember quickstart report", "",
             f"Machine: {_machine()}. Stage times below are those of the run that produced each stage "
             f"(a re-run skips finished stages); this invocation took {fmt_duration(wall_seconds)}.", ""]
    estimated = {name: (estimated_seconds or {}).get(name) for name in stage_seconds}
    corrected = {name: (corrected_seconds or {}).get(name) for name in stage_seconds}

    def against_plan(seconds: float | None, estimate: float | None) -> tuple[str, str]:
        if seconds is None or not estimate:
            return "-", "-"
        return fmt_duration(estimate), f"{seconds / estimate:.2f}"

    lines += md_table(("stage", "time", "plan's estimate", "time / estimate", "corrected by pretraining's steps",
                       "time / corrected"), [
        (STAGE_TITLES[name], fmt_duration(seconds) if seconds is not None else "-",
         *against_plan(seconds, estimated[name]), *against_plan(seconds, corrected[name]))
        for name, seconds in stage_seconds.items()])
    total = sum(s for s in stage_seconds.values() if s is not None)
    planned = sum(estimated.values()) if all(e is not None for e in estimated.values()) else None
    lines += [f"| **all stages** | **{fmt_duration(total)}** | {' | '.join(against_plan(total, planned))} | | |", ""]
    if any(corrected.values()):
        lines += ["The plan's estimate comes from a probe of a few steps before the run; the corrected one, for "
                  "pretraining and the stages after it, from pretraining's own mean step time once it had run part of "
                  "its steps (training.callbacks.EtaCallback; `CORRECTED_AT` in recipes/quickstart.py says how much).",
                  ""]

    lines += ["## Data", ""]
    lines += md_table(("", "value"), _rows(numbers, [
        ("documents_read", "documents read (the interpreter's standard library)", ",d"),
        ("documents_kept", "after cleaning, filters and dedup", ",d"),
        ("validation_documents", "held out for validation", ",d"),
        ("train_tokens", "training tokens", ",d"),
        ("tokenizer_bytes_per_token", "tokenizer: bytes per token on held-out text", ".2f")]))
    lines += ["", "## Pretraining", ""]
    lines += md_table(("", "value"), _rows(numbers, [
        ("pretrain_steps", "optimizer steps", ",d"), ("pretrain_first_loss", "first logged training loss", ".3f"),
        ("pretrain_last_loss", "last logged training loss", ".3f"),
        ("pretrain_seconds", "training time (s)", ".0f")]))
    report_md = pretrain_dir / "run_report" / "report.md"
    if report_md.is_file():
        lines += ["", f"Full run report: [{report_md.relative_to(output_dir)}]({report_md.relative_to(output_dir)})",
                  ""]
        for plot in sorted((pretrain_dir / "run_report").glob("*.png")):
            lines.append(f"![{plot.stem}]({plot.relative_to(output_dir)})")
    lines += ["", "## Held-out perplexity", "",
              "Bits per byte = summed next-token loss / (ln 2 x UTF-8 bytes of the text): independent of the "
              "tokenizer, so it compares with any other model on the same text.", ""]
    held_out = results.get("perplexity", {})
    lines += md_table(("model", "bits/byte", "perplexity", "tokens scored", "documents"), [
        (name, fmt_number(r.get("bits_per_byte"), ".3f"), fmt_number(r.get("perplexity"), ",.1f"),
         fmt_number(r.get("num_tokens"), ",d"), fmt_number(r.get("num_documents"), ",d"))
        for name, r in (("untrained (same architecture)", held_out.get("untrained", {})),
                        ("pretrained", held_out.get("pretrained", {})))] + [
        (f"{name} (each document compressed on its own)",
         f"not measured ({r['not_measured']})" if r.get("not_measured") else fmt_number(r["bits_per_byte"], ".3f"),
         "-", "-", fmt_number(r["documents"], ",d")) for name, r in held_out.get("compressors", {}).items()])
    if held_out.get("compressors", {}).get("zpaq -m5", {}).get("bits_per_byte") is not None:
        lines += ["", "Compressed sizes include each format's headers. zpaq's is a one-file archive per document, "
                  "about 1 KB of which is format overhead (model description, journal, hashes, index), not text."]
    lines += ["", "## LoRA finetuning (docstring -> function)", ""]
    lines += md_table(("", "value"), _rows(numbers, [
        ("instruction_examples_train", "pairs built for training", ",d"),
        ("lora_examples_trained", "examples trained on (pairs with a response token left within max_length)", ",d"),
        ("instruction_examples_validation", "pairs built for validation", ",d"),
        ("lora_examples_evaluated", "validation examples scored", ",d"),
        ("lora_trainable_parameters", "trainable (adapter) parameters", ",d"),
        ("lora_response_loss_before", "validation response loss before", ".3f"),
        ("lora_response_loss_after", "validation response loss after", ".3f")]))
    curve = _lora_curve(output_dir, finetune_dir)
    if curve:
        lines += ["", f"![LoRA training loss]({curve.relative_to(output_dir)})"]
    lines += ["", "## Hyperparameters", ""]
    lines += _hyperparameters(results)
    lines += ["", "## Samples", ""]
    for group, title in (("pretrained", "Pretrained model, completion"), ("finetuned", "Finetuned model, chat")):
        for item in results.get("generate", {}).get(group, []):
            lines += [f"**{title}**, prompt:", "", *_fenced(item["prompt"]), "", "output:", "",
                      *_fenced(item["text"]), ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (output_dir / "results.json").write_text(json.dumps({
        "headline": numbers, "stage_seconds": stage_seconds, "estimated_stage_seconds": estimated,
        "corrected_stage_seconds": corrected,
        "probe_step_seconds": probe_step_seconds,
        "stages": results}, indent=2) + "\n", encoding="utf-8")
    return report
