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
