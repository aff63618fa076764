"""End-of-run artefacts of a pretraining run: a report with plots, and the model card.

- `write_run_report(output_dir, log_history, summary)` writes `<output_dir>/run_report/`: PNG plots of the
  Trainer's `log_history` (loss, learning rate, gradient norm, throughput, MFU) and `report.md`, which sums the
  run up (tokens, time, losses, throughput) and sets the `modeling.sizing` estimate beside what was measured.
- `run_statistics(log_history, summary)` is the summary behind the report, as a dict.
- `write_model_card(output_dir, ...)` writes `<output_dir>/README.md`, a Hub model card: YAML metadata
  (`huggingface_hub.ModelCardData`, with a `model-index` for the validation metrics) and a Markdown body.

Both work offline and read nothing but their arguments (and, for the card, whether a run report sits next
to it). Plots are drawn on matplotlib's Agg canvas directly: no pyplot, no display, no global state.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .configuration_ember import EmberConfig
from .sizing import active_parameters, count_parameters, format_duration


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

REPORT_DIR = "run_report"
FIGURE_SIZE_INCHES = (6.0, 3.5)
FIGURE_DPI = 100  # 600 x 350 pixels: small enough to keep in a model repository
CARD_TAGS = ["ember", "llama-style", "pretraining", "text-generation"]

# ---------------------------------------------------------------------------------------------------------------
# Reading the Trainer's log_history
# ---------------------------------------------------------------------------------------------------------------
# The Trainer appends three kinds of entries, each with "step": periodic training logs ("loss", "grad_norm",
# "learning_rate", plus what ThroughputCallback and NonFiniteGuardCallback add), evaluation logs ("eval_loss",
# ...) and one summary at the end of `train()` ("train_runtime", "train_loss", ...).


def _training_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry and "step" in entry]


def _eval_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "eval_loss" in entry and "step" in entry]


def _train_summary(log_history: list[dict]) -> dict:
    return next((entry for entry in reversed(log_history) if "train_runtime" in entry), {})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float], int]:
    """(steps, values, number of non-finite values left out) of `key` over the entries that have it."""
    steps, values, non_finite = [], [], 0
    for entry in entries:
        if key in entry and _is_number(entry[key]):
            if math.isfinite(entry[key]):
                steps.append(entry["step"])
                values.append(float(entry[key]))
            else:
                non_finite += 1
    return steps, values, non_finite


def _last(entries: list[dict], key: str) -> Any:
    return next((entry[key] for entry in reversed(entries) if key in entry), None)


def _median(entries: list[dict], key: str) -> float | None:
    values = _series(entries, key)[1]
    return statistics.median(values) if values else None


def perplexity(loss: float | None) -> float | None:
    """exp(loss), inf where that overflows, None for no loss."""
    if loss is None:
        return None
    return math.inf if loss > 700 else math.exp(loss)  # exp overflows a float past ~709.78; nan stays nan


def _ratio(measured: float | None, estimated: float | None) -> float | None:
    return measured / estimated if _finite(measured) and _finite(estimated) and estimated > 0 else None


def run_statistics(log_history: list[dict], summary: dict) -> dict[str, Any]:
    """The numbers of `report.md`; a value is None where neither the logs nor `summary` have it.

    `summary` keys used (all optional): `tokens_seen`, `tokens_per_step`, `wall_seconds` (fallbacks for what
    the logs lack), `estimated_seconds`, `estimated_memory_gb`.
    """
    train, evals, final = _training_logs(log_history), _eval_logs(log_history), _train_summary(log_history)
    steps = max((entry["step"] for entry in log_history if _is_number(entry.get("step"))), default=None)

    tokens_seen, tokens_source = summary.get("tokens_seen"), "given"
    if tokens_seen is None and _last(log_history, "num_input_tokens_seen") is not None:
        tokens_seen, tokens_source = _last(log_history, "num_input_tokens_seen"), "num_input_tokens_seen"
    if tokens_seen is None and summary.get("tokens_per_step") and steps is not None:
        tokens_seen, tokens_source = summary["tokens_per_step"] * steps, "tokens_per_step x steps"

    wall_seconds = final.get("train_runtime", summary.get("wall_seconds"))
    peak_memory = _series(train, "peak_memory_gb")[1]
    final_train_loss, final_eval_loss = _last(train, "loss"), _last(evals, "eval_loss")
    stats = {
        "steps": steps,
        "tokens_seen": tokens_seen,
        "tokens_seen_source": tokens_source if tokens_seen is not None else None,
        "wall_seconds": wall_seconds,
        "final_train_loss": final_train_loss,
        "final_train_perplexity": perplexity(final_train_loss),
        "mean_train_loss": final.get("train_loss"),
        "final_eval_loss": final_eval_loss,
        "final_eval_perplexity": perplexity(final_eval_loss),
        "median_tokens_per_s": _median(train, "tokens_per_s"),
        "median_tflops_per_device": _median(train, "tflops_per_device"),
        "median_mfu": _median(train, "mfu"),
        "peak_memory_gb": max(peak_memory) if peak_memory else None,
        "skipped_steps": _last(train, "skipped_steps"),
        "non_finite_loss_logs": sum(1 for entry in train if not _finite(entry["loss"])),
        "estimated_seconds": summary.get("estimated_seconds"),
        "estimated_memory_gb": summary.get("estimated_memory_gb"),
    }
    stats["time_ratio"] = _ratio(stats["wall_seconds"], stats["estimated_seconds"])
    stats["memory_ratio"] = _ratio(stats["peak_memory_gb"], stats["estimated_memory_gb"])
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    source: str  # "train" or "eval": which log entries hold `key`
    key: str
    label: str


@dataclass(frozen=True)
class _Plot:
    file: str
    title: str
    ylabel: str
    lines: tuple[_Line, ...]
    why_missing: str = ""  # appended to the note when the first line's metric is absent
    scale: float = 1.0


PLOTS = (
    _Plot("loss.png", "Loss", "cross-entropy (nats/token)",
          (_Line("train", "loss", "train"), _Line("eval", "eval_loss", "eval"))),
    _Plot("learning_rate.png", "Learning rate", "learning rate", (_Line("train", "learning_rate", "learning rate"),)),
    _Plot("grad_norm.png", "Gradient norm", "global norm before clipping", (_Line("train", "grad_norm", "grad norm"),)),
    _Plot("throughput.png", "Throughput", "tokens/s (all devices)", (_Line("train", "tokens_per_s", "tokens/s"),),
          why_missing="ThroughputCallback adds it"),
    _Plot("mfu.png", "Model FLOPs utilisation", "MFU (%)", (_Line("train", "mfu", "MFU"),),
          why_missing="it needs the device's peak FLOP/s: a known GPU, or `peak_flops`", scale=100.0),
)


def _draw(path: Path, plot: _Plot, lines: list[tuple[str, list[int], list[float]]]) -> None:
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)  # attaches the raster canvas that savefig renders with
    axes = figure.add_subplot()
    for label, steps, values in lines:
        few = len(steps) <= 30  # markers keep sparse series (evaluations, short runs) visible
        axes.plot(steps, [value * plot.scale for value in values], label=label, linewidth=1.2,
                  marker="o" if few else None, markersize=3)
    axes.set_title(plot.title)
    axes.set_xlabel("step")
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    if len(lines) > 1:
        axes.legend()
    figure.tight_layout()  # arranges inside the fixed canvas; the file stays figsize x dpi pixels
    figure.savefig(path, dpi=FIGURE_DPI, format="png")


def _write_plots(report_dir: Path, log_history: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw every plot whose main metric was logged; returns ([(title, file)], [notes on what was left out]).

    A plot's first line is its main metric: without it the plot is omitted. Further lines (the eval loss)
    are drawn when present and noted when not.
    """
    entries = {"train": _training_logs(log_history), "eval": _eval_logs(log_history)}
    written, notes = [], []
    for plot in PLOTS:
        lines = []
        for line in plot.lines:
            steps, values, non_finite = _series(entries[line.source], line.key)
            if non_finite:
                notes.append(f"{plot.title}: {non_finite} non-finite `{line.key}` value(s) not drawn.")
            if steps:
                lines.append((line.label, steps, values))
            elif line is plot.lines[0]:
                break
            else:
                notes.append(f"{plot.title}: no `{line.key}` in the logs, so the {line.label} curve is omitted.")
        path = report_dir / plot.file
        if lines:
            _draw(path, plot, lines)
            written.append((plot.title, plot.file))
        else:
            path.unlink(missing_ok=True)  # a plot left in this folder by an earlier run would mislead
            reason = f" ({plot.why_missing})" if plot.why_missing else ""
            notes.append(f"{plot.title}: not plotted, no finite `{plot.lines[0].key}` in the logs{reason}.")
    return written, notes


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------


def _number(value: Any, spec: str) -> str:
    if not _is_number(value):
        return str(value)
    return format(value, spec) if math.isfinite(value) else str(float(value))  # "nan", "inf"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{format_duration(seconds)} ({seconds:,.0f} s)"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]


# (stats key, row label, formatter, note when missing)
_SUMMARY_ROWS: tuple[tuple[str, str, Callable[[Any], str], str], ...] = (
    ("steps", "Optimizer steps", lambda v: f"{v:,}", "no `step` in the logs"),
    ("tokens_seen", "Tokens seen", lambda v: f"{v:,.0f}", "no `num_input_tokens_seen` in the logs and no "
                                                          "`tokens_per_step` given"),
    ("wall_seconds", "Wall time (`train()`)", _duration, "no `train_runtime` in the logs"),
    ("final_train_loss", "Final training loss", lambda v: _number(v, ".4f"), "no training loss logged"),
    ("final_train_perplexity", "Final training perplexity", lambda v: _number(v, ".2f"), "no training loss logged"),
    ("mean_train_loss", "Mean training loss over the run", lambda v: _number(v, ".4f"), "no `train_loss` summary"),
    ("final_eval_loss", "Final eval loss", lambda v: _number(v, ".4f"), "no evaluation in the logs"),
    ("final_eval_perplexity", "Final eval perplexity", lambda v: _number(v, ".2f"), "no evaluation in the logs"),
    ("median_tokens_per_s", "Throughput, median (tokens/s)", lambda v: f"{v:,.0f}", "no `tokens_per_s` in the logs"),
    ("median_tflops_per_device", "TFLOP/s per device, median", lambda v: f"{v:.3g}",
     "no `tflops_per_device` in the logs"),
    ("median_mfu", "MFU, median", lambda v: f"{v:.1%}", "no `mfu` in the logs (device peak FLOP/s unknown)"),
    ("peak_memory_gb", "Peak memory per process (GiB)", lambda v: f"{v:.2f}", "no `peak_memory_gb` in the logs"),
    ("skipped_steps", "Skipped steps (non-finite gradients)", str, "no `skipped_steps` in the logs"),
    ("non_finite_loss_logs", "Training logs with a non-finite loss", str, ""),
)


def _summary_section(stats: dict) -> list[str]:
    rows, missing = [], []
    for key, label, formatter, why in _SUMMARY_ROWS:
        if stats[key] is None:
            missing.append(f"{label}: {why}.")
        else:
            value = formatter(stats[key])
            if key == "tokens_seen" and stats["tokens_seen_source"] != "given":
                value += f" (from {stats['tokens_seen_source']})"
            rows.append((label, value))
    lines = ["## Summary", "", *_table(("metric", "value"), rows)]
    if missing:
        lines += ["", "Not recorded:", "", *[f"- {note}" for note in missing]]
    return lines


def _sizing_section(stats: dict) -> list[str]:
    rows, notes = [], []
    for label, estimated, measured, ratio, formatter in (
        ("Wall time", stats["estimated_seconds"], stats["wall_seconds"], stats["time_ratio"], _duration),
        ("Peak memory per device (GiB)", stats["estimated_memory_gb"], stats["peak_memory_gb"],
         stats["memory_ratio"], lambda v: f"{v:.2f}"),
    ):
        if estimated is None:
            notes.append(f"{label}: no estimate given.")
            continue
        rows.append((label, formatter(estimated), "n/a" if measured is None else formatter(measured),
                     "n/a" if ratio is None else f"{ratio:.2f}"))
    lines = ["## Sizing estimate vs measured", ""]
    if rows:
        lines += _table(("", "estimated (`modeling.sizing`)", "measured", "measured / estimated"), rows)
        lines += ["", "The time estimate counts training FLOPs only; the measured `train_runtime` also holds "
                      "evaluations, checkpoints and start-up, and after a resume only the last session. Measured "
                      "memory is the peak of `torch.cuda.max_memory_allocated` (peak RSS on CPU)."]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines


def write_run_report(output_dir: Path, log_history: list[dict], summary: dict) -> Path:
    """Write `<output_dir>/run_report/` (PNG plots and `report.md`); returns the path of `report.md`.

    `log_history` is `trainer.state.log_history`. `summary` (every key optional):
        name: the report's title (default: the output folder's name);
        config: recipe keys and values, listed as given;
        tokens_seen / tokens_per_step / wall_seconds: used where the logs lack them;
        estimated_seconds: `modeling.sizing.training_time` for the run;
        estimated_memory_gb: `memory_per_gpu(...)["total"] / 2**30`.
    A metric missing from the logs leaves out its plot or row, and the report says which and why.
    """
    output_dir = Path(output_dir)
    report_dir = output_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    stats = run_statistics(log_history, summary)
    plots, plot_notes = _write_plots(report_dir, log_history)

    lines = [f"# Training report: {summary.get('name') or output_dir.resolve().name}", ""]
    lines += _summary_section(stats) + [""] + _sizing_section(stats) + ["", "## Plots", ""]
    for title, file in plots:
        lines += [f"![{title}]({file})", ""]
    if not plots:
        lines += ["No metric in the logs could be plotted.", ""]
    lines += [f"- {note}" for note in plot_notes] + ([""] if plot_notes else [])
    config = summary.get("config")
    lines += ["## Configuration", ""]
    lines += _table(("key", "value"), [(str(key), value) for key, value in config.items()]) if config else [
        "No recipe configuration was given."]

    report = report_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def _human(count: float) -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:g}"


def _architecture_rows(config: EmberConfig) -> list[tuple[str, str]]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    attention = "multi-head" if kv_heads == heads else "multi-query" if kv_heads == 1 else "grouped-query"
    positions = config.position_embedding_type
    if positions == "rope":
        theta = (config.rope_parameters or {}).get("rope_theta")
        positions = f"RoPE (theta {theta:g})" if _is_number(theta) else "RoPE"
    total = count_parameters(config)
    rows = [
        ("Layers", str(config.num_hidden_layers)),
        ("Hidden size", str(config.hidden_size)),
        ("MLP width", f"{config.intermediate_size} ({config.mlp_type})"),
        ("Attention heads / KV heads", f"{heads} / {kv_heads} ({attention}), head dim {config.head_dim}"),
        ("Vocabulary", f"{config.vocab_size:,}"),
        ("Context length", f"{config.max_position_embeddings:,}"),
        ("Positions", positions),
        ("Normalisation", f"{config.norm_type}, {config.norm_placement}" + (", QK-norm" if config.qk_norm else "")),
        ("Tied input/output embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("Parameters", f"{_human(total)} ({total:,})"),
    ]
    if config.sliding_window:
        rows.insert(6, ("Sliding window", f"{config.sliding_window:,}"))
    if not config.is_causal:
        rows.insert(0, ("Attention pattern", "bidirectional encoder"))
    if config.is_moe:
        rows.append(("Experts", f"{config.num_local_experts}, {config.num_experts_per_tok} per token "
                                f"({_human(active_parameters(config))} active parameters)"))
    return rows


# Training facts in the order they are listed; keys not named here follow under their own names.
_TRAINING_LABELS = {
    "tokens": "Tokens seen", "steps": "Optimizer steps", "tokens_per_step": "Tokens per step",
    "global_batch_size": "Global batch (sequences)", "seq_len": "Sequence length",
    "learning_rate": "Peak learning rate", "lr_schedule": "Learning-rate schedule", "warmup_steps": "Warmup steps",
    "weight_decay": "Weight decay", "optimizer": "Optimizer", "precision": "Precision", "hardware": "Hardware",
    "world_size": "Devices (world size)", "wall_seconds": "Wall time",
}


def _training_rows(training: dict) -> list[tuple[str, str]]:
    ordered = [key for key in _TRAINING_LABELS if key in training] + [k for k in training if k not in _TRAINING_LABELS]
    rows = []
    for key in ordered:
        value = training[key]
        if value is None:
            continue
        if key == "tokens" and _is_number(value):
            text = f"{_human(value)} ({value:,.0f})"
        elif key == "wall_seconds" and _finite(value):
            text = _duration(value)
        elif isinstance(value, str):
            text = value
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = json.dumps(value, default=str)
        rows.append((_TRAINING_LABELS.get(key, key), text))
    return rows


def _eval_numbers(metrics: dict) -> dict[str, float]:
    """Validation loss and perplexity (computed from the loss when not given), and the run's mean train loss."""
    numbers = {}
    if _finite(metrics.get("eval_loss")):
        numbers["eval_loss"] = float(metrics["eval_loss"])
        numbers["eval_perplexity"] = float(metrics.get("eval_perplexity") or perplexity(metrics["eval_loss"]))
    if _finite(metrics.get("train_loss")):
        numbers["train_loss"] = float(metrics["train_loss"])
    return numbers


def _card_metadata(model_name: str, datasets: list[str], numbers: dict[str, float], license: str) -> ModelCardData:
    eval_results = None
    if datasets and "eval_loss" in numbers:  # a model-index entry has to name the dataset it was measured on
        common = dict(task_type="text-generation", task_name="Causal language modeling", dataset_type=datasets[0],
                      dataset_name=datasets[0], dataset_split="validation")
        eval_results = [
            EvalResult(metric_type="perplexity", metric_name="Perplexity",
                       metric_value=round(numbers["eval_perplexity"], 4), **common),
            EvalResult(metric_type="loss", metric_name="Cross-entropy (nats/token)",
                       metric_value=round(numbers["eval_loss"], 4), **common),
        ]
    return ModelCardData(library_name="transformers", license=license, datasets=list(datasets) or None,
                         tags=list(CARD_TAGS), pipeline_tag="text-generation", model_name=model_name,
                         eval_results=eval_results)


def _card_body(output_dir: Path, model_name: str, config: EmberConfig, datasets: list[str],
               numbers: dict[str, float], training: dict, repo_id: str | None) -> str:
    location = repo_id or f"path/to/{model_name}"
    data = ", ".join(f"`{name}`" for name in datasets) if datasets else "data not recorded in this card"
    if config.is_causal:
        about = (f"{model_name} is a decoder-only, LLaMA-style language model pretrained from scratch with Ember "
                 f"on {data}. It is a base model: it continues text, and has not been tuned to follow instructions.")
        usage = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
            f'model = AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True)',
            'inputs = tokenizer("Once upon a time", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50)[0]))",
        ]
        export = [
            "To get a stock transformers checkpoint that needs no remote code (`LlamaForCausalLM`, or "
            "`MistralForCausalLM` / `MixtralForCausalLM` for sliding-window and mixture-of-experts models), "
            "convert it with Ember:", "",
            "```bash", f"python -m modeling.convert to-hf {location} {model_name}-hf", "```", "",
        ]
    else:
        about = (f"{model_name} is a bidirectional encoder pretrained from scratch with Ember by masked-language "
                 f"modelling on {data}. Finetune it as a classifier (`recipes/finetune_classifier.py`); the "
                 "evaluation numbers below are over masked tokens only.")
        usage = [
            "from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
            f'model = AutoModelForMaskedLM.from_pretrained("{location}", trust_remote_code=True)',
            f'classifier = AutoModelForSequenceClassification.from_pretrained("{location}", num_labels=2, '
            "trust_remote_code=True)",
        ]
        export = []
    lines = [
        f"# {model_name}", "",
        about, "",
        "## Model", "", *_table(("", "value"), _architecture_rows(config)), "",
        "## How to use", "",
        "The folder holds Ember's modeling code, so transformers loads it with `trust_remote_code=True`:", "",
        "```python", *usage, "```", "",
        *export,
        "## Training", "",
    ]
    rows = _training_rows(training)
    lines += [*_table(("", "value"), rows), ""] if rows else ["No training details were recorded.", ""]
    lines += ["## Evaluation", ""]
    if "eval_loss" in numbers:
        lines += [f"On the held-out validation split of the training data ({data}):", "",
                  *_table(("metric", "value"), [("Cross-entropy (nats/token)", f"{numbers['eval_loss']:.4f}"),
                                                ("Perplexity", _number(numbers["eval_perplexity"], ".2f"))]), ""]
    else:
        lines += ["No held-out evaluation was run.", ""]
    if "train_loss" in numbers:
        lines += [f"Mean training loss over the run: {numbers['train_loss']:.4f}.", ""]
    report = output_dir / REPORT_DIR
    if (report / "report.md").is_file():
        lines += ["## Training curves", ""]
        if (report / "loss.png").is_file():
            lines += [f"![Training loss]({REPORT_DIR}/loss.png)", ""]
        lines += [f"More plots and the run's numbers are in [{REPORT_DIR}/report.md]({REPORT_DIR}/report.md).", ""]
    lines += [
        "## Limitations", "",
        "The model reproduces the patterns, errors and biases of its training data, and it states false things "
        "fluently. It has had no safety or instruction tuning; check its output before relying on it.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: Path, *, model_name: str, config: EmberConfig | dict, datasets: list[str],
                     metrics: dict, training: dict, license: str = "apache-2.0",
                     repo_id: str | None = None) -> Path:
    """Write `<output_dir>/README.md`, a Hub model card, and return its path.

    Args:
        model_name: the card's title and `model-index` name.
        config: the model's `EmberConfig`, or its dict (`config.to_dict()`, or preset-style fields).
        datasets: dataset names or Hub ids, for the metadata and the text.
        metrics: the run's metrics; `eval_loss`, `eval_perplexity` (else exp(eval_loss)) and `train_loss` are read.
        training: facts about the run, shown as given; known keys (tokens, steps, tokens_per_step,
            global_batch_size, seq_len, learning_rate, lr_schedule, warmup_steps, weight_decay, optimizer,
            precision, hardware, world_size, wall_seconds) get labels, others appear under their own names.
        license: a Hub license id.
        repo_id: the Hub id used in the loading example (default: a placeholder path).

    Call it after `write_run_report` to have the card link the report and show the loss curve. Writing makes
    no network request.
    """
    output_dir = Path(output_dir)
    if isinstance(config, dict):
        config = EmberConfig.from_dict(config)
    datasets = list(datasets)
    numbers = _eval_numbers(metrics)
    card_data = _card_metadata(model_name, datasets, numbers, license)
    body = _card_body(output_dir, model_name, config, datasets, numbers, training, repo_id)
    # Built from our own text rather than `ModelCard.from_template`, whose default template is a long form of
    # placeholder sections; ModelCard still serialises and checks the metadata block.
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = output_dir / "README.md"
    card.save(path)
    return path


__all__ = ["PLOTS", "REPORT_DIR", "perplexity", "run_statistics", "write_model_card", "write_run_report"]
