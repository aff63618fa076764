"""Downstream benchmarks of a checkpoint with lm-evaluation-harness (`pip install -e ".[eval]"`).

    python recipes/eval_downstream.py --model=outputs/ember-125m --tasks=hellaswag,arc_easy,piqa \\
        [--num_fewshot=0 --batch_size=16 --limit=500 --output=downstream.json]
    python recipes/eval_downstream.py --model=outputs/ember-125m \\
        --include_path=tests/data/lm_eval_tasks --tasks=ember_python_mc,ember_python_text        # local tasks

The checkpoint (Ember or stock) is loaded once and handed to lm-eval's `HFLM`; tasks come from lm-eval's
registry plus any YAML task folders in `include_path`. Registry tasks download their data from the Hub.
How rolling log-likelihood tasks relate to `recipes/eval_perplexity.py`: `evaluation/downstream.py`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli import ConfigError, parse_args, report_error
from evaluation.downstream import build_task_manager, evaluate_downstream, results_table
from modeling.loading import load_checkpoint, torch_dtype


@dataclass
class DownstreamArguments:
    model: str = field(metadata={"help": "checkpoint folder (Ember or stock transformers)"})
    tasks: str = field(metadata={"help": "comma-separated lm-eval task, group or tag names"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    include_path: list[str] = field(default_factory=list, metadata={"help": "folders of YAML tasks (repeatable)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: each task's own)"})
    limit: float | None = field(default=None, metadata={"help": "examples per task (a fraction if < 1)"})
    batch_size: str = field(default="1", metadata={"help": "an integer or 'auto'"})
    max_length: int | None = field(default=None, metadata={"help": "context length (default: the model's)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16, float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "for checkpoints whose code is not here"})
    output: str | None = field(default=None, metadata={"help": "write the results as JSON here"})


PATH_KEYS = ("model", "tokenizer", "include_path.*", "output")


def main(argv: Sequence[str] | None = None) -> int:
    # lm-eval narrates every step at INFO level (task building, request counts, model placement); keep its warnings.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        (args,) = parse_args((DownstreamArguments,), sys.argv[1:] if argv is None else argv,
                             prog="recipes/eval_downstream.py", description=__doc__.split("\n\n")[0],
                             path_keys=PATH_KEYS, space_values=True)
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        if not tasks:
            raise ConfigError("tasks: no task names given")
        batch_size: int | str = args.batch_size
        if batch_size != "auto":
            if not args.batch_size.isdigit() or int(args.batch_size) < 1:
                raise ConfigError(f"batch_size: {args.batch_size!r} is not a positive integer or 'auto'")
            batch_size = int(args.batch_size)
        torch_dtype(args.dtype)
        task_manager = build_task_manager(tasks, args.include_path)  # a typo fails before the model loads
        model, tokenizer = load_checkpoint(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code)
        results = evaluate_downstream(model, tokenizer, tasks, task_manager, num_fewshot=args.num_fewshot,
                                      limit=args.limit, batch_size=batch_size, max_length=args.max_length)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)

    print(results_table(results))
    if results.get("groups"):
        print("\n" + results_table(results, "groups"))
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
