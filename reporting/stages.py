"""The chained quickstart's machinery: stages that run once, a plan with an estimated time per stage, and the
numbers each stage prints when it ends.

The estimate scales the stage times of a reference run (`QuickstartArguments.eta_reference`: measured seconds
per stage, and what one pretraining step took there) by how long one pretraining step of the configured model
takes on this machine, measured at start with the run's optimizer (`training.plan.probe_step_seconds`, a few
seconds on 2 CPU cores).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.io import atomic_write_text
from reporting.markdown import fmt_duration

STAGE_TITLES = {"data": "data preparation", "pretrain": "pretraining", "perplexity": "held-out perplexity",
                "instructions": "instruction set", "finetune": "LoRA finetuning", "generate": "generation",
                "report": "report"}


class Stages:
    """Runs stages in order; a finished stage's result is read back instead of running it again."""

    def __init__(self, folder: Path, force: bool):
        self.folder, self.force = folder, force
        self.results: dict[str, dict] = {}
        self.current: str | None = None  # the stage running or last run
        folder.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        return (self.folder / f"{name}.json").is_file() and not self.force

    def run(self, name: str, work: Callable[[], dict]) -> dict:
        marker, title = self.folder / f"{name}.json", STAGE_TITLES[name]
        self.current = name
        number = len(self.results) + 1
        if self.done(name):
            result = json.loads(marker.read_text())
            print(f"\n=== [{number}/{len(STAGE_TITLES)}] {title}: done in an earlier run "
                  f"({fmt_duration(result['seconds'])}), skipped ===", flush=True)
        else:
            print(f"\n=== [{number}/{len(STAGE_TITLES)}] {title} ===", flush=True)
            start = time.perf_counter()
            result = {**work(), "seconds": time.perf_counter() - start}
            atomic_write_text(marker, json.dumps(result, indent=2) + "\n")
            print(f"=== {title}: {fmt_duration(result['seconds'])} ===", flush=True)
        self.results[name] = result
        line = stage_numbers(name, result)
        if line:
            print(f"    {line}", flush=True)
        return result


def estimate_seconds(reference: dict[str, Any], probe_seconds: float, max_steps: int) -> dict[str, float]:
    """Estimated seconds per stage: the reference run's, scaled by this machine's step time against the reference
    machine's; pretraining from its own step count. Empty when there is no reference."""
    seconds, reference_step = reference.get("seconds") or {}, reference.get("probe_step_seconds")
    if not seconds or not reference_step:
        return {}
    scale = probe_seconds / reference_step
    estimate = {name: value * scale for name, value in seconds.items()}
    if "pretrain" in estimate and reference.get("pretrain_steps"):
        estimate["pretrain"] *= max_steps / reference["pretrain_steps"]
    return estimate


def corrected_seconds(reference: dict[str, Any], estimates: list[dict[str, Any]], fraction: float,
                      started_at: float) -> dict[str, float]:
    """Estimated seconds of pretraining and the stages after it once pretraining has timed `fraction` of its steps
    (the last of `estimates`, from `training.callbacks.EtaCallback`, made at `fraction` or before; `started_at`:
    the stage's start, `time.time()`): pretraining's from its own steps, the later stages' the reference run's
    scaled by its step time against the reference run's (`step_seconds`). Empty without such an estimate."""
    eta = next((e for e in reversed(estimates) if e["fraction"] <= fraction), None)
    if eta is None:
        return {}
    estimate = {"pretrain": eta["at_time"] - started_at + eta["remaining_seconds"]}
    seconds, reference_step = reference.get("seconds") or {}, reference.get("step_seconds")
    if seconds and reference_step:
        later = list(STAGE_TITLES)[list(STAGE_TITLES).index("pretrain") + 1:]
        estimate |= {name: seconds[name] * eta["step_seconds"] / reference_step for name in later if name in seconds}
    return estimate


def print_plan(stages: Stages, estimate: dict[str, float], probe_seconds: float, details: dict[str, str]) -> None:
    """The stages this run will do, each with what it does and its estimated time."""
    print(f"Plan (one pretraining step takes {probe_seconds:.2f} s on this machine):", flush=True)
    total = 0.0
    for name, title in STAGE_TITLES.items():
        if stages.done(name):
            when = "done earlier, skipped"
        elif name in estimate:
            when = f"~{fmt_duration(estimate[name])}"
            total += estimate[name]
        else:
            when = ""
        print(f"  {title:<20} {when:<22} {details.get(name, '')}", flush=True)
    if total:
        print(f"  {'total':<20} ~{fmt_duration(total)}", flush=True)


def print_corrected_plan(estimate: dict[str, float]) -> None:
    """The stages after pretraining, re-estimated from pretraining's own step time (`corrected_seconds`)."""
    later = {name: seconds for name, seconds in estimate.items() if name != "pretrain"}
    if later:
        print(f"Plan, corrected by pretraining's own steps: the stages left take ~{fmt_duration(sum(later.values()))} "
              f"({', '.join(f'{STAGE_TITLES[name]} ~{fmt_duration(s)}' for name, s in later.items())})", flush=True)


def stage_numbers(name: str, result: dict) -> str:
    """The headline numbers of a finished stage, as one line."""
    if name == "data":
        report = result.get("report", {})
        steps = {step["step"]: step for step in report.get("steps", [])}
        return (f"{steps.get('read', {}).get('docs_in', 0):,} documents read, "
                f"{steps.get('split', {}).get('docs_out', 0):,} kept; "
                f"{report.get('tokens_train', {}).get('num_tokens', 0):,} training tokens; tokenizer "
                f"{report.get('tokenizer_report', {}).get('bytes_per_token', 0):.2f} bytes/token on held-out text")
    if name == "pretrain":
        first, last = result.get("first_logged_loss"), result.get("last_logged_loss")
        losses = f"loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else "no loss logged"
        return f"{result.get('steps', 0):,} steps; {losses}"
    if name == "perplexity":
        untrained, pretrained = result.get("untrained", {}), result.get("pretrained", {})
        if pretrained.get("bits_per_byte") is None:
            return ""
        return (f"held-out bits per byte {untrained.get('bits_per_byte', float('nan')):.3f} (untrained) -> "
                f"{pretrained['bits_per_byte']:.3f} (pretrained) on {pretrained.get('num_documents', 0)} documents, "
                f"{pretrained.get('num_tokens', 0):,} tokens")
    if name == "instructions":
        return f"{result.get('train', 0):,} training and {result.get('validation', 0):,} validation pairs"
    if name == "finetune":
        metrics = result.get("metrics", {})
        before, after = metrics.get("eval_before", {}).get("loss"), metrics.get("eval_after", {}).get("loss")
        trained = metrics.get("data", {}).get("train", {}).get("examples")
        if before is None or after is None:
            return ""
        return f"response loss {before:.3f} -> {after:.3f}; trained on {trained:,} examples"
    if name == "generate":
        return f"{sum(len(samples) for samples in result.values() if isinstance(samples, list))} samples"
    return ""


def print_summary(results: dict[str, dict], wall_seconds: float) -> None:
    """The closing table: every stage's time and headline numbers."""
    print("\nSummary", flush=True)
    for name, title in STAGE_TITLES.items():
        if name in results:
            line = stage_numbers(name, results[name])
            print(f"  {title:<20} {fmt_duration(results[name]['seconds']):>16}   {line}", flush=True)
    print(f"  {'this run':<20} {fmt_duration(wall_seconds):>16}", flush=True)
