"""The report of a pretraining run: plots of its logs and a summary next to the sizing estimate.

- `write_run_report(output_dir, log_history, summary)` writes `<output_dir>/run_report/`: PNG plots of the
  Trainer's `log_history` (loss, learning rate, gradient norm, throughput, MFU) and `report.md`, which sums the
  run up (tokens, time, losses, throughput) and sets the `modeling.sizing` estimate beside what was measured.
- `run_statistics(log_history, summary)` is the summary behind the report, as a dict.
- `cpu_model_name`, `available_cores`: the machine facts reports and benchmarks print.

It works offline and reads nothing but its arguments. Plots are drawn on matplotlib's Agg canvas directly: no
pyplot, no display, no global state. The model card is `reporting.model_card`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.downstream import PREFIX as DOWNSTREAM_PREFIX
from evaluation.downstream import SECONDS as DOWNSTREAM_SECONDS
from evaluation.perplexity import perplexity
from reporting.markdown import fmt_duration, fmt_number, is_finite, is_number, md_table


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
SETTINGS_FILE = "settings.json"  # in REPORT_DIR: the settings the report lists, for other reports to read
ETA_FILE = "eta.json"  # in REPORT_DIR: the run's estimate of its own duration (training.callbacks.EtaCallback)
DOWNSTREAM_PLOT = "downstream_{metric}.png"
FIGURE_SIZE_INCHES = (7.0, 4.0)
FIGURE_DPI = 110  # 770 x 440 pixels: readable, and small enough to keep in a model repository
# What a loss (and its perplexity) covers under each pretraining objective, said after its label: a masked-LM
# "perplexity" over the masked tokens is not comparable with a causal LM's over every token.
SCORED_TOKENS = {"clm": "", "prefix_lm": " of the suffix tokens", "ul2": " of the target tokens",
                 "mlm": " of the masked tokens"}


def scored_tokens(objective: str) -> str:
    """`SCORED_TOKENS[objective]`; an unknown objective is a one-line ValueError naming the field."""
    if objective not in SCORED_TOKENS:
        raise ValueError(f"objective: expected one of {', '.join(SCORED_TOKENS)}, got {objective!r}")
    return SCORED_TOKENS[objective]

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


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float], int]:
    """(steps, values, number of non-finite values left out) of `key` over the entries that have it."""
    steps, values, non_finite = [], [], 0
    for entry in entries:
        if key in entry and is_number(entry[key]):
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


def _ratio(measured: float | None, estimated: float | None) -> float | None:
    return measured / estimated if is_finite(measured) and is_finite(estimated) and estimated > 0 else None


def run_statistics(log_history: list[dict], summary: dict) -> dict[str, Any]:
    """The numbers of `report.md`; a value is None where neither the logs nor `summary` have it.

    `summary` keys used (all optional): `tokens_seen`, `tokens_per_step`, `wall_seconds` (fallbacks for what
    the logs lack), `estimated_seconds`, `estimated_memory_gb`.
    """
    train, evals, final = _training_logs(log_history), _eval_logs(log_history), _train_summary(log_history)
    steps = max((entry["step"] for entry in log_history if is_number(entry.get("step"))), default=None)

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
        "non_finite_loss_logs": sum(1 for entry in train if not is_finite(entry["loss"])),
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
    optional: bool = False  # a metric only some runs log: no note when it is absent


PLOTS = (
    _Plot("loss.png", "Loss", "cross-entropy (nats/token)",
          (_Line("train", "loss", "train"), _Line("eval", "eval_loss", "eval"))),
    _Plot("bits_per_byte.png", "Held-out bits per byte", "bits per byte (validation split)",
          (_Line("eval", "eval_bits_per_byte", "eval"),),
          why_missing="it needs evaluations during training (eval_strategy) on a data_prep run's validation split"),
    _Plot("learning_rate.png", "Learning rate", "learning rate", (_Line("train", "learning_rate", "learning rate"),)),
    _Plot("grad_norm.png", "Gradient norm", "global norm before clipping", (_Line("train", "grad_norm", "grad norm"),)),
    _Plot("throughput.png", "Throughput", "tokens/s (all devices)", (_Line("train", "tokens_per_s", "tokens/s"),),
          why_missing="ThroughputCallback adds it"),
    _Plot("mfu.png", "Model FLOPs utilisation", "MFU (%)", (_Line("train", "mfu", "MFU"),),
          why_missing="it needs the device's peak FLOP/s: a known GPU, or `peak_flops`", scale=100.0),
    _Plot("batch_size.png", "Batch size (batch_size_warmup_tokens)", "tokens per step",
          (_Line("train", "batch_tokens", "tokens per step"),), optional=True),
    _Plot("z_loss.png", "z-loss", "mean log(Z)^2 per token", (_Line("train", "z_loss", "log(Z)^2"),), optional=True),
)


def draw_lines(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]],
               tokens_per_step: int | None = None, markers: list[tuple[int, str]] = ()) -> None:
    """A line plot of (label, steps, values) series, with a dashed vertical line at each (step, label) marker.
    With `tokens_per_step` the x axis counts tokens (what compares across batch sizes) and a second axis on top
    counts steps; otherwise the x axis is the step."""
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)  # attaches the raster canvas that savefig renders with
    axes = figure.add_subplot()
    scale = tokens_per_step or 1
    for label, steps, values in lines:
        few = len(steps) <= 30  # markers keep sparse series (evaluations, short runs) visible
        axes.plot([step * scale for step in steps], values, label=label, linewidth=1.4,
                  marker="o" if few else None, markersize=3)
    for step, label in markers:  # e.g. a loss spike the run rolled back from
        axes.axvline(step * scale, color="tab:red", linestyle="--", linewidth=1.5)
        axes.annotate(label, (step * scale, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                      ha="right", fontsize=7, color="tab:red")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if tokens_per_step:
        axes.set_xlabel("tokens")
        axes.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
        steps_axis = axes.secondary_xaxis("top", functions=(lambda t: t / scale, lambda s: s * scale))
        steps_axis.set_xlabel("step")
    else:
        axes.set_xlabel("step")
    if len(lines) > 1:
        axes.legend()
    figure.tight_layout()  # arranges inside the fixed canvas; the file stays figsize x dpi pixels
    figure.savefig(path, dpi=FIGURE_DPI, format="png")


def _write_plots(report_dir: Path, log_history: list[dict], tokens_per_step: int | None = None,
                 rollbacks: list[dict] = ()
                 ) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw every plot whose main metric was logged; returns ([(title, file)], [notes on what was left out]).

    A plot's first line is its main metric: without it the plot is omitted. Further lines (the eval loss)
    are drawn when present and noted when not. Each loss-spike rollback is a marker on the loss plot.
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
                lines.append((line.label, steps, [value * plot.scale for value in values]))
            elif line is plot.lines[0]:
                break
            else:
                notes.append(f"{plot.title}: no `{line.key}` in the logs, so the {line.label} curve is omitted.")
        path = report_dir / plot.file
        if lines:
            markers = [(event["spike_step"], f"rollback {event['rollback']}") for event in rollbacks
                       ] if plot.file == "loss.png" else []
            draw_lines(path, plot.title, plot.ylabel, lines, tokens_per_step, markers)
            written.append((plot.title, plot.file))
        else:
            path.unlink(missing_ok=True)  # a plot left in this folder by an earlier run would mislead
            if plot.optional:
                continue
            reason = f" ({plot.why_missing})" if plot.why_missing else ""
            notes.append(f"{plot.title}: not plotted, no finite `{plot.lines[0].key}` in the logs{reason}.")
    # Downstream tasks during training (training/downstream.py): a plot per metric, a line per task.
    for stale in report_dir.glob(DOWNSTREAM_PLOT.format(metric="*")):
        stale.unlink()
    scored = [entry for entry in log_history if any(key.startswith(DOWNSTREAM_PREFIX) for key in entry)]
    seconds = _series(scored, DOWNSTREAM_SECONDS)[1]
    cost = f", {statistics.median(seconds):.1f} s per evaluation" if seconds else ""
    by_metric: dict[str, list] = {}
    for key in sorted({key for entry in scored for key in entry if key.startswith(DOWNSTREAM_PREFIX)}):
        task, _, metric = key.removeprefix(DOWNSTREAM_PREFIX).rpartition("/")
        steps, values, _ = _series(scored, key)
        if steps:
            by_metric.setdefault(metric, []).append((task, steps, values))
    for metric, lines in by_metric.items():
        file, title = DOWNSTREAM_PLOT.format(metric=metric), f"Downstream tasks: {metric}{cost}"
        draw_lines(report_dir / file, title, metric, lines, tokens_per_step)
        written.append((title, file))
    return written, notes


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------


_SCORED_ROWS = ("final_train_loss", "final_train_perplexity", "mean_train_loss", "final_eval_loss",
                "final_eval_perplexity")

# (stats key, row label, formatter, note when missing)
_SUMMARY_ROWS: tuple[tuple[str, str, Callable[[Any], str], str], ...] = (
    ("steps", "Optimizer steps", lambda v: f"{v:,}", "no `step` in the logs"),
    ("tokens_seen", "Tokens seen", lambda v: f"{v:,.0f}", "no `num_input_tokens_seen` in the logs and no "
                                                          "`tokens_per_step` given"),
    ("wall_seconds", "Wall time (`train()`)", fmt_duration, "no `train_runtime` in the logs"),
    ("final_train_loss", "Final training loss", lambda v: fmt_number(v, ".4f"), "no training loss logged"),
    ("final_train_perplexity", "Final training perplexity", lambda v: fmt_number(v, ".2f"), "no training loss logged"),
    ("mean_train_loss", "Mean training loss over the run", lambda v: fmt_number(v, ".4f"), "no `train_loss` summary"),
    ("final_eval_loss", "Final eval loss", lambda v: fmt_number(v, ".4f"), "no evaluation in the logs"),
    ("final_eval_perplexity", "Final eval perplexity", lambda v: fmt_number(v, ".2f"), "no evaluation in the logs"),
    ("median_tokens_per_s", "Throughput, median (tokens/s)", lambda v: f"{v:,.0f}", "no `tokens_per_s` in the logs"),
    ("median_tflops_per_device", "TFLOP/s per device, median", lambda v: f"{v:.3g}",
     "no `tflops_per_device` in the logs"),
    ("median_mfu", "MFU, median", lambda v: f"{v:.1%}", "no `mfu` in the logs (device peak FLOP/s unknown)"),
    ("peak_memory_gb", "Peak memory per process (GiB; host RSS on CPU)", lambda v: f"{v:.2f}",
     "no `peak_memory_gb` in the logs"),
    ("skipped_steps", "Skipped steps (non-finite gradients)", str, "no `skipped_steps` in the logs"),
    ("non_finite_loss_logs", "Training logs with a non-finite loss", str, ""),
)


def _summary_section(stats: dict, scored: str = "") -> list[str]:
    rows, missing = [], []
    for key, label, formatter, why in _SUMMARY_ROWS:
        label += scored if key in _SCORED_ROWS else ""
        if stats[key] is None:
            missing.append(f"{label}: {why}.")
        else:
            value = formatter(stats[key])
            if key == "tokens_seen" and stats["tokens_seen_source"] != "given":
                value += f" (from {stats['tokens_seen_source']})"
            rows.append((label, value))
    lines = ["## Summary", "", *md_table(("metric", "value"), rows)]
    if missing:
        lines += ["", "Not recorded:", "", *[f"- {note}" for note in missing]]
    return lines


def _sizing_section(stats: dict, on_gpu: bool) -> list[str]:
    rows, notes = [], []
    memory = (("Peak memory per device (GiB)", stats["estimated_memory_gb"], stats["peak_memory_gb"],
               stats["memory_ratio"], lambda v: f"{v:.2f}"),) if on_gpu else ()
    if not on_gpu and stats["estimated_memory_gb"] is not None:
        notes.append(f"Memory: the estimate ({stats['estimated_memory_gb']:.2f} GiB per GPU) is for GPU training; "
                     "this run was on the CPU, whose peak host RSS"
                     + (f" ({stats['peak_memory_gb']:.2f} GiB)" if stats["peak_memory_gb"] is not None else "")
                     + " also holds the Python process, libraries and data, so the two are not compared.")
    for label, estimated, measured, ratio, formatter in (
        ("Wall time", stats["estimated_seconds"], stats["wall_seconds"], stats["time_ratio"], fmt_duration),
        *memory,
    ):
        if estimated is None:
            notes.append(f"{label}: no estimate given.")
            continue
        rows.append((label, formatter(estimated), "n/a" if measured is None else formatter(measured),
                     "n/a" if ratio is None else f"{ratio:.2f}"))
    lines = ["## Sizing estimate vs measured", ""]
    if rows:
        lines += md_table(("", "estimated (`modeling.sizing`)", "measured", "measured / estimated"), rows)
        lines += ["", "The time estimate counts training FLOPs only; the measured `train_runtime` also holds "
                      "evaluations, checkpoints and start-up, and after a resume only the last session."
                  + (" Measured memory is the peak of `torch.cuda.max_memory_allocated`." if on_gpu else "")]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines


def _rollback_section(rollbacks: list[dict]) -> list[str]:
    """The loss spikes the run rolled back from (training/spikes.py): what the screen of the blocks found, and the
    blocks it skipped."""
    if not rollbacks:
        return []

    def decision(event: dict) -> str:
        if event.get("decision") == "shift":
            return f"a shift in the data ({event['why']}): nothing skipped, spike test re-baselined"
        if event.get("decision") == "skip":
            return f"{event['anomalous_blocks']} bad blocks skipped"
        return "the blocks since the checkpoint skipped"  # a run from before the screen

    def screened(event: dict) -> str:
        if "screened_steps" not in event:
            return "-"
        first, last = event["screened_steps"]
        return (f"steps {first}-{last}: threshold {event['block_threshold']:.4f} (median "
                f"{event['reference_block_loss']:.4f}), highest {event['top_block_loss']:.4f}")

    rows = [(event["rollback"], event["spike_step"], f"{event['loss']:.4f}", f"{event['window_mean']:.4f}",
             f"{event['zscore']:.1f}", event["resumed_from_step"], screened(event), decision(event),
             ", ".join(f"{start}-{end - 1}" for start, end in event["skipped_blocks"]) or "-")
            for event in rollbacks]
    return ["## Loss spikes", "",
            *md_table(("rollback", "spike at step", "loss", "window mean", "z-score", "resumed from step",
                       "blocks scored from the checkpoint's weights", "decision", "blocks skipped (never read again)"),
                      rows),
            "", "The logs above continue from each rollback's checkpoint; the spiking steps are not in them. Each "
            "rollback first scores, forward only, the blocks since the checkpoint and after the spike against the "
            "blocks trained just before it: blocks above the threshold are bad data and skipped; when none stands "
            "out, or the rise outlasts the spike test's window, the data shifted and nothing is skipped.", ""]


def write_run_report(output_dir: Path, log_history: list[dict], summary: dict) -> Path:
    """Write `<output_dir>/run_report/` (PNG plots and `report.md`); returns the path of `report.md`.

    `log_history` is `trainer.state.log_history`. `summary` (every key optional):
        name: the report's title (default: the output folder's name);
        config: recipe keys and values, listed as given;
        tokens_seen / tokens_per_step / wall_seconds: used where the logs lack them;
        estimated_seconds: `modeling.sizing.training_time` for the run;
        estimated_memory_gb: `memory_per_gpu(...)["total"] / 2**30`, compared when `device` is "cuda";
        device: "cuda" or "cpu";
        objective: the pretraining objective (`SCORED_TOKENS`, default "clm"), named in the loss rows' labels;
        rollbacks: the loss-spike rollbacks (`DataState.rollbacks`), marked on the loss plot and listed.
    A metric missing from the logs leaves out its plot or row, and the report says which and why.
    """
    output_dir = Path(output_dir)
    report_dir = output_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    scored = scored_tokens(summary.get("objective", "clm"))
    stats = run_statistics(log_history, summary)
    rollbacks = summary.get("rollbacks") or []
    # A tokens axis while the batch grows (tokens_seen given: steps of unequal size) would misplace every point.
    tokens_axis = None if summary.get("tokens_seen") else summary.get("tokens_per_step")
    plots, plot_notes = _write_plots(report_dir, log_history, tokens_axis, rollbacks)

    lines = [f"# Training report: {summary.get('name') or output_dir.resolve().name}", ""]
    lines += _summary_section(stats, scored) + [""] + _sizing_section(stats, summary.get("device") == "cuda")
    lines += [""] + _rollback_section(rollbacks) + ["## Plots", ""]
    for title, file in plots:
        lines += [f"![{title}]({file})", ""]
    if not plots:
        lines += ["No metric in the logs could be plotted.", ""]
    lines += [f"- {note}" for note in plot_notes] + ([""] if plot_notes else [])
    config = summary.get("config")
    lines += ["## Configuration", ""]
    lines += md_table(("key", "value"), [(str(key), value) for key, value in config.items()]) if config else [
        "No recipe configuration was given."]

    report = report_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report
