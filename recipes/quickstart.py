"""Ember end to end, offline, on a CPU: raw text to a finetuned model and a report, in one command.

    python recipes/quickstart.py                       # = --config recipes/configs/quickstart_cpu.yaml
    python recipes/quickstart.py --config recipes/configs/quickstart_cpu.yaml --pretrain_overrides='{max_steps: 20}'

Stages, each one a recipe of its own that this script only chains:
  1. data          python -m data_prep on the embedded corpus (the interpreter's standard library):
                   cleaning, quality filters, dedup, held-out split, tokenizer training, packing
  2. pretrain      recipes/pretrain.py: a nano model on the packed shards
  3. perplexity    held-out bits per byte of the untrained and of the pretrained model (evaluation.perplexity)
  4. instructions  "docstring -> function" pairs from the training documents (data_prep.instructions)
  5. finetune      recipes/finetune_lora.py: LoRA on the pretrained model, response loss before and after
  6. generate      samples from the pretrained model and chat answers from the finetuned one
  7. report        <output_dir>/report.md and results.json with every number

A stage that finished leaves `<output_dir>/stages/<stage>.json`, and a re-run skips it (`--force=true`
reruns everything); an interrupted data or pretraining stage resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from cli import INTERRUPTED, ConfigError, dotted_items, parse_args, report_error
from data_prep.config import load_config
from data_prep.documents import read_documents
from data_prep.instructions import build_instruction_set
from data_prep.pipeline import run_pipeline
from evaluation.baselines import compressor_bits_per_byte
from evaluation.generation import generate, load_for_generation
from evaluation.perplexity import evaluate_path
from modeling import EmberConfig
from modeling.loading import load_checkpoint
from recipes import finetune_lora as finetune_recipe
from recipes import pretrain as pretrain_recipe
from reporting.dashboard import start_dashboard
from reporting.quickstart_report import write_quickstart_report
from reporting.run_report import ETA_FILE, REPORT_DIR, SETTINGS_FILE
from reporting.stages import (
    STAGE_TITLES,
    Stages,
    corrected_seconds,
    estimate_seconds,
    print_corrected_plan,
    print_plan,
    print_summary,
)
from training.plan import plan_run, probe_step_seconds
from training.run import keep_freed_memory

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart_cpu.yaml"
PATH_KEYS = ("output_dir", "data_config", "pretrain_config", "finetune_config")
# The report's corrected estimate is pretraining's own at this fraction of its steps (benchmarks/results/eta_check.md:
# how close each fraction came).
CORRECTED_AT = 0.25


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="", metadata={"help": "everything the run writes goes under this folder"})
    force: bool = field(default=False, metadata={"help": "rerun finished stages"})
    data_config: str = ""
    data_overrides: dict = field(default_factory=dict, metadata={"help": "pipeline keys (dotted) over data_config"})
    pretrain_config: str = ""
    pretrain_overrides: dict = field(default_factory=dict)
    eval_max_documents: int = field(default=0, metadata={"help": "held-out documents scored; 0 = all"})
    eval_window: int = 512
    eval_stride: int = 256
    eval_batch_size: int = 4
    instruction_max_examples: int = 2000
    finetune_config: str = ""
    finetune_overrides: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list, metadata={"help": "completions from the pretrained model"})
    chat_prompts: list[str] = field(default_factory=list, metadata={"help": "questions for the finetuned model"})
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 40
    eta_reference: dict = field(default_factory=dict, metadata={
        "help": "a measured run the plan's estimates scale from: {probe_step_seconds, step_seconds (its pretraining's, "
                "as training.callbacks.EtaCallback measures them), pretrain_steps, seconds}"})
    dashboard: bool = field(default=False, metadata={
        "help": "watch the training live: TensorBoard on 127.0.0.1 (needs the tracking extra), URL printed at start"})
    dashboard_port: int = 6006


def held_out_bits_per_byte(model, tokenizer, data_dir: Path, args: QuickstartArguments) -> dict:
    with torch.no_grad():
        result = evaluate_path(model, tokenizer, data_dir / "documents" / "validation", window=args.eval_window,
                               stride=args.eval_stride, batch_size=args.eval_batch_size,
                               max_documents=args.eval_max_documents or None)
    return result.to_dict()


def sample(model_dir: Path, prompts: list[str], args: QuickstartArguments, chat: bool) -> list[dict]:
    model, tokenizer = load_for_generation(model_dir, device="cpu")
    samples = []
    for prompt in prompts:
        print(f"\n--- {'chat' if chat else 'prompt'}: {prompt!r}", flush=True)
        streamer = transformers.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        text = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=1.0, top_k=args.top_k, seed=0, chat=chat, streamer=streamer)
        samples.append({"prompt": prompt, "chat": chat, "text": text})
    return samples


def plan(args: QuickstartArguments, stages: Stages, data_dir: Path) -> tuple[float, dict[str, float]]:
    """Print what each stage will do and, from a probe of this machine's speed, how long it should take; returns
    the probe's seconds per pretraining step and the estimated seconds per stage (the report sets them against the
    measured ones)."""
    data = load_config(args.data_config, {**dotted_items(args.data_overrides), "output_dir": str(data_dir)})
    settings = pretrain_recipe.parse(config=args.pretrain_config, overrides={
        **args.pretrain_overrides, "data_dir": str(data_dir), "output_dir": str(data_dir)})
    model_args = settings.model
    config = EmberConfig.from_preset(model_args.preset, **{
        "vocab_size": data.tokenizer.vocab_size, "max_position_embeddings": data.pack.seq_len,
        **model_args.model_overrides})
    run = plan_run(settings.training, settings.run, data.pack.seq_len, tp_size=model_args.tp_size)
    probe = probe_step_seconds(config, run.global_batch_size, run.seq_len, settings.run)
    estimate = estimate_seconds(args.eta_reference, probe, run.max_steps)
    print_plan(stages, estimate, probe, {
        "data": f"{', '.join(source.name for source in data.sources)} -> tokenizer ({data.tokenizer.vocab_size:,}) "
                f"and blocks of {data.pack.seq_len}",
        "pretrain": f"{model_args.preset} preset, {run.max_steps} steps x {run.tokens_per_step:,} "
                    f"tokens = {run.total_tokens:,} tokens",
        "perplexity": f"bits per byte on {args.eval_max_documents or 'all'} held-out documents",
        "instructions": f"up to {args.instruction_max_examples:,} docstring -> function pairs",
        "finetune": "LoRA on the pretrained model",
        "generate": f"{len(args.prompts)} completion(s), {len(args.chat_prompts)} chat answer(s)",
        "report": f"{Path(args.output_dir) / 'report.md'}"})
    return probe, estimate


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
        (args,) = parse_args((QuickstartArguments,), argv, prog="recipes/quickstart.py",
                             description=__doc__.split("\n\n")[0], config=None if has_config else DEFAULT_CONFIG,
                             path_keys=PATH_KEYS)
    except ConfigError as err:
        return report_error(err)
    keep_freed_memory()  # before the plan's probe, so that it times the steps the run will take
    out = Path(args.output_dir)
    data_dir, pretrain_dir = out / "data", out / "pretrain"
    instructions_dir, finetune_dir = out / "instructions", out / "finetune"
    stages = Stages(out / "stages", args.force)
    started = time.perf_counter()
    if args.dashboard:  # both trainings log to TensorBoard under `out`, which the server watches
        try:
            dashboard, url = start_dashboard(out, args.dashboard_port)
        except ConfigError as err:
            return report_error(err)
        print(f"Dashboard: {url} (TensorBoard over {out}; it stops when the quickstart ends)", flush=True)
        args.pretrain_overrides = {**args.pretrain_overrides, "report_to": ["tensorboard"]}
        args.finetune_overrides = {**args.finetune_overrides, "report_to": ["tensorboard"]}

    def data() -> dict:
        overrides = {**dotted_items(args.data_overrides), "output_dir": str(data_dir)}
        run_pipeline(load_config(args.data_config, overrides), workers=2)
        return {"report": json.loads((data_dir / "report.json").read_text())}

    def pretrain() -> dict:
        started_at = time.time()
        code = pretrain_recipe.main(config=args.pretrain_config, overrides={
            **args.pretrain_overrides, "data_dir": str(data_dir), "output_dir": str(pretrain_dir),
            "resume_from_checkpoint": "auto"})
        if code != 0:  # an error line, or where a Ctrl-C stopped it, is printed already
            raise SystemExit(code)
        state = json.loads((pretrain_dir / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        settings, eta = pretrain_dir / REPORT_DIR / SETTINGS_FILE, pretrain_dir / REPORT_DIR / ETA_FILE
        return {"metrics": json.loads((pretrain_dir / "all_results.json").read_text()), "steps": state["global_step"],
                "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
                "config": json.loads(settings.read_text()) if settings.is_file() else {},
                # how long pretraining and the stages after it should take, from its own steps (at CORRECTED_AT)
                "corrected_estimate": corrected_seconds(args.eta_reference, json.loads(eta.read_text())["estimates"],
                                                        CORRECTED_AT, started_at)
                if eta.is_file() and eta.stat().st_mtime >= started_at else {}}

    def perplexity() -> dict:
        model, tokenizer = load_checkpoint(pretrain_dir, device="cpu")
        torch.manual_seed(0)  # the same architecture, freshly initialised: what the data alone gives
        untrained = type(model)._from_config(model.config, attn_implementation="sdpa").eval()
        # The same documents through general-purpose compressors: the yardstick a model should beat.
        compressors = compressor_bits_per_byte(read_documents(data_dir / "documents" / "validation"),
                                               max_documents=args.eval_max_documents or None)
        return {"untrained": held_out_bits_per_byte(untrained, tokenizer, data_dir, args),
                "pretrained": held_out_bits_per_byte(model, tokenizer, data_dir, args), "compressors": compressors}

    def instructions() -> dict:
        return build_instruction_set(data_dir, instructions_dir, max_examples=args.instruction_max_examples)

    def finetune() -> dict:
        code = finetune_recipe.main(config=args.finetune_config, overrides={
            **args.finetune_overrides, "model_name_or_path": str(pretrain_dir),
            "train_file": str(instructions_dir / "train.jsonl"),
            "validation_file": str(instructions_dir / "validation.jsonl"), "output_dir": str(finetune_dir)})
        if code != 0:
            raise SystemExit(code)
        return {"metrics": json.loads((finetune_dir / "finetune_metrics.json").read_text()),
                "output_dir": str(finetune_dir)}

    def samples() -> dict:
        return {"pretrained": sample(pretrain_dir, args.prompts, args, chat=False),
                "finetuned": sample(finetune_dir / "merged", args.chat_prompts, args, chat=True)}

    try:
        probe, estimate = plan(args, stages, data_dir)
        stages.run("data", data)
        stages.run("pretrain", pretrain)
        print_corrected_plan(stages.results["pretrain"].get("corrected_estimate") or {})
        stages.run("perplexity", perplexity)
        stages.run("instructions", instructions)
        stages.run("finetune", finetune)
        stages.run("generate", samples)
        report = stages.run("report", lambda: {"path": str(write_quickstart_report(
            out, stages.results, pretrain_dir=pretrain_dir, wall_seconds=time.perf_counter() - started,
            probe_step_seconds=probe, estimated_seconds=estimate,
            corrected_seconds=stages.results["pretrain"].get("corrected_estimate")))})
    except KeyboardInterrupt:  # pretraining and finetuning say where they stopped themselves (a return code)
        where = STAGE_TITLES[stages.current] if stages.current else "the plan"
        print(f"stopped by Ctrl-C in {where}: finished stages are kept; the same command goes on from there",
              file=sys.stderr, flush=True)
        return INTERRUPTED
    finally:
        if args.dashboard:
            dashboard.terminate()
            dashboard.wait(timeout=30)
            print(f"Dashboard stopped; `tensorboard --logdir {out}` shows the runs again", flush=True)
    print_summary(stages.results, time.perf_counter() - started)
    print(f"\nReport: {report['path']}\nNumbers: {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    transformers.logging.set_verbosity_warning()
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
