"""Command line: `python -m data_prep run --config recipes/configs/data/stdlib.yaml [--key=value ...]`.

    python -m data_prep run       --config C.yaml            all steps, all shards
    python -m data_prep filter    --config C.yaml            one step (also: dedup, split, tokenizer, pack)
    python -m data_prep run       --config C.yaml --num-shards 64 --shard-index 7    one shard (array jobs)
    python -m data_prep report    --config C.yaml            print the merged report of a finished run
    python -m data_prep run       --config C.yaml --executor ray      the same steps on a Ray cluster
    python -m data_prep run       --config C.yaml --executor slurm    submit dependent Slurm array jobs
    python -m data_prep status    --config C.yaml            tasks done per step (and Slurm job states)

Any config key can be overridden: `--pack.seq_len=2048 --sources.0.max_docs=1000`.
Errors in the config or (with `--strict`) in the input are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep.config import ConfigError, load_config
from data_prep.pipeline import STEPS, PipelineError, collect_reports, run_pipeline
from data_prep.report import DataError, format_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"run": "run every step in order (resumes: finished shards are not redone)",
             "filter": "per shard: read, clean, quality filters, PII, toxicity, decontamination, dedup signatures",
             "dedup": "global: exact and MinHash near-duplicate clusters over all shards",
             "split": "per shard: drop duplicates, route documents to train / validation",
             "tokenizer": "global: train the tokenizer (or copy tokenizer.path) and report compression",
             "pack": "per shard: tokenize and pack into seq_len + 1 blocks",
             "report": "print the merged report of the finished shards",
             "status": "progress of a run: tasks done and failed per step (and Slurm job states)"}
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", required=True, help="pipeline YAML (see recipes/configs/data/)")
        if name in ("report", "status"):
            continue
        command.add_argument("--executor", choices=["local", "ray", "slurm"],
                             help="where tasks run (default: the config's `executor`, local)")
        command.add_argument("--num-shards", type=int, help="split every source into this many shards")
        command.add_argument("--shard-index", type=int, action="append",
                             help="only this shard (repeatable); global steps wait until all shards are done")
        command.add_argument("--workers", type=int, default=1, help="shards processed in parallel on this machine")
        command.add_argument("--strict", action="store_true", help="stop at the first bad input record")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, overrides = build_parser().parse_known_args(argv)
    if args.command not in ("report", "status"):
        if args.executor:
            overrides.append(f"--executor={args.executor}")
        if args.num_shards is not None:
            overrides.append(f"--num_shards={args.num_shards}")
        if args.strict:
            overrides.append("--strict=true")
    try:
        cfg = load_config(args.config, overrides)
        if args.command == "report":
            reports = collect_reports(cfg)
            if not reports:
                raise PipelineError(f"{cfg.root}: no finished run to report on")
            print(format_table(reports))
            return 0
        if args.command == "status":
            from data_prep.executors import format_progress, progress

            print(format_progress(progress(cfg, list(STEPS))))
            return 0
        for index in args.shard_index or []:
            if not 0 <= index < cfg.num_shards:
                raise ConfigError(f"--shard-index: {index} is outside 0..{cfg.num_shards - 1}")
        steps = list(STEPS) if args.command == "run" else [args.command]
        run_pipeline(cfg, steps, args.shard_index, args.workers)
    except (ConfigError, DataError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
