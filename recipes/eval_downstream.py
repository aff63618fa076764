"""Downstream benchmarks of a checkpoint with lm-evaluation-harness (`pip install -e ".[eval]"`).

    python recipes/eval_downstream.py --model outputs/ember-125m --tasks hellaswag,arc_easy,piqa \\
        [--num_fewshot 0 --batch_size 16 --limit 500 --output downstream.json]
    python recipes/eval_downstream.py --model outputs/ember-125m \\
        --include_path tests/data/lm_eval_tasks --tasks ember_python_mc,ember_python_text        # local tasks

The checkpoint (Ember or stock) is loaded once and handed to lm-eval's `HFLM`; tasks come from lm-eval's
registry plus any YAML task folders in --include_path. Registry tasks download their data from the Hub.
Rolling log-likelihood tasks (wikitext, ...) score each document in disjoint windows of --max_length
tokens (default: the model's max_position_embeddings) after a BOS/EOS prefix, which is
`modeling.evaluation.evaluate_perplexity` with window == stride == max_length: the bits_per_byte agree.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

from modeling.evaluation import DTYPES, load_model_and_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (Ember or stock transformers)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--include_path", action="append", default=[], help="folder of YAML tasks (repeatable)")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1), for quick runs")
    parser.add_argument("--batch_size", default="1", help="an integer or 'auto'")
    parser.add_argument("--max_length", type=int, help="context length (default: max_position_embeddings)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (default: auto)")
    parser.add_argument("--trust_remote_code", action="store_true", help="for checkpoints whose code is not here")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


def _known(name: str, task_names: list[str]) -> bool:
    return name in task_names or bool(fnmatch.filter(task_names, name)) or Path(name).is_file()


def build_task_manager(tasks: list[str], include_paths: list[str]):
    """A TaskManager that knows every requested task; unknown names are a one-line ValueError."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"--include_path: {path} is not a folder")
    if include_paths:  # indexing only the local folders is much faster than lm-eval's whole registry
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(_known(task, local.all_tasks) for task in tasks):
            return local
    manager = TaskManager(include_path=include_paths or None)
    unknown = [task for task in tasks if not _known(task, manager.all_tasks)]
    if unknown:
        raise ValueError(f"--tasks: unknown task {unknown[0]!r} (not in lm-eval's registry or --include_path)")
    return manager


def evaluate_downstream(model, tokenizer, tasks: list[str], task_manager, *, num_fewshot: int | None = None,
                        limit: float | None = None, batch_size: int | str = 1, max_length: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` on an already loaded model (see `build_task_manager`); returns its results."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(model.device))
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                           log_samples=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    batch_size = args.batch_size if args.batch_size == "auto" else None
    try:
        if not tasks:
            raise ValueError("--tasks: no task names given")
        if batch_size is None:
            if not args.batch_size.isdigit() or int(args.batch_size) < 1:
                raise ValueError(f"--batch_size: {args.batch_size!r} is not a positive integer or 'auto'")
            batch_size = int(args.batch_size)
        task_manager = build_task_manager(tasks, args.include_path)  # a typo fails before the model loads
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                                    trust_remote_code=args.trust_remote_code)
        results = evaluate_downstream(model, tokenizer, tasks, task_manager, num_fewshot=args.num_fewshot,
                                      limit=args.limit, batch_size=batch_size, max_length=args.max_length)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from lm_eval.utils import make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        report = {"model": args.model, "tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit,
                  "max_length": args.max_length, **{key: results.get(key) for key in
                                                    ("results", "groups", "n-shot", "versions", "higher_is_better")}}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
