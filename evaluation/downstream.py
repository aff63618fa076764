"""Downstream benchmarks with lm-evaluation-harness (`pip install -e ".[eval]"`) on an already loaded model.

    manager = build_task_manager(["hellaswag", "arc_easy"], include_paths=[])   # a typo fails before any load
    results = evaluate_downstream(model, tokenizer, ["hellaswag", "arc_easy"], manager, limit=500)

Tasks come from lm-eval's registry plus any YAML task folders in `include_paths`; registry tasks download
their data from the Hub. Rolling log-likelihood tasks (wikitext, ...) score each document in disjoint windows
of `max_length` tokens (default: the model's max_position_embeddings) after a BOS/EOS prefix, which is
`evaluation.perplexity.evaluate_perplexity` with window == stride == max_length: the bits per byte agree.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

PREFIX = "downstream/"  # the scores logged while pretraining: downstream/<task>/<metric>
SECONDS = "downstream_seconds"  # and what each evaluation cost


def _known(name: str, task_names: list[str]) -> bool:
    return name in task_names or bool(fnmatch.filter(task_names, name)) or Path(name).is_file()


def build_task_manager(tasks: list[str], include_paths: list[str]):
    """A TaskManager that knows every requested task; unknown names are a one-line ValueError."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"include_path: {path} is not a folder")
    if include_paths:  # indexing only the local folders is much faster than lm-eval's whole registry
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(_known(task, local.all_tasks) for task in tasks):
            return local
    manager = TaskManager(include_path=include_paths or None)
    unknown = [task for task in tasks if not _known(task, manager.all_tasks)]
    if unknown:
        raise ValueError(f"tasks: unknown task {unknown[0]!r} (not in lm-eval's registry or include_path)")
    return manager


def evaluate_downstream(model, tokenizer, tasks: list[str], task_manager, *, num_fewshot: int | None = None,
                        limit: float | None = None, batch_size: int | str = 1, max_length: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` on a loaded model (see `build_task_manager`); returns its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(model.device))
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                           log_samples=False)


def results_table(results: dict, section: str = "results") -> str:
    """lm-eval's results (per task, or per group with `section="groups"`) as a Markdown table:
    task, version, filter, n-shot, metric, direction, value and standard error."""
    header = ("Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr")
    rows = []
    for task, metrics in (results.get(section) or {}).items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or metric == "alias":
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            arrow = {True: "↑", False: "↓"}.get(better.get(metric), "")
            rows.append((metrics.get("alias", task), str(results.get("versions", {}).get(task, "")), filter_name,
                         str(results.get("n-shot", {}).get(task, "")), metric, arrow, _number(value),
                         "±" if isinstance(stderr, (int, float)) else "", _number(stderr)))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value in (None, "N/A") else str(value)
    return f"{value:.4f}"
