"""Command line: `python -m data_prep COMMAND --config C.yaml [--key=value ...]`.

    python -m data_prep run       --config C.yaml                        all steps, all shards
    python -m data_prep filter    --config C.yaml                        one step (also: dedup, split, tokenizer, pack)
    python -m data_prep run       --config C.yaml --num_shards=64 --shard_index=7   one shard (array jobs)
    python -m data_prep run       --config C.yaml --executor=ray         the same steps on a Ray cluster
    python -m data_prep run       --config C.yaml --executor=slurm       submit dependent Slurm array jobs
    python -m data_prep status    --config C.yaml                        tasks done per step (and Slurm job states)
    python -m data_prep report    --config C.yaml                        print the merged report of a finished run
    python -m data_prep run       --help                                 every key with its default

Any key of the pipeline YAML can be overridden: `--pack.seq_len=2048 --sources.0.max_docs=1000`.
Besides the YAML's keys: `--workers=N` (shards processed in parallel on this machine) and `--shard_index=I`
(only this shard; repeatable). Errors in the config or (with `--strict`) in the input are one line on
stderr, exit status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from cli import INTERRUPTED, ConfigError, parse_args, report_error
from data_prep.config import PATH_KEYS, PipelineConfig
from data_prep.pipeline import STEPS, collect_reports, run_pipeline
from data_prep.report import DataError, PipelineError, format_table

COMMANDS = {"run": "run every step in order (resumes: finished shards are not redone)",
            "filter": "per shard: read, clean, quality filters, PII, toxicity, decontamination, dedup signatures",
            "dedup": "global: exact and MinHash near-duplicate clusters over all shards",
            "split": "per shard: drop duplicates, route documents to train / validation",
            "tokenizer": "global: train the tokenizer (or copy tokenizer.path) and report compression",
            "pack": "per shard: tokenize and pack into seq_len + 1 blocks",
            "report": "print the merged report of the finished shards",
            "status": "progress of a run: tasks done and failed per step (and Slurm job states)"}


@dataclass
class RunOptions:
    workers: int = field(default=1, metadata={"help": "shards processed in parallel on this machine"})
    shard_index: list[int] = field(default_factory=list, metadata={
        "help": "only these shards (repeatable); global steps wait until all shards are done"})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\ncommands:\n" + "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items()))
        return 0 if argv else 2
    command, argv = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ConfigError(f"{command}: unknown command (one of {', '.join(COMMANDS)})")
        if "--config" not in argv and not any(a.startswith("--config=") for a in argv) \
                and not {"-h", "--help"} & set(argv):
            raise ConfigError("--config: required (a pipeline YAML, see recipes/configs/data/)")
        cfg, options = parse_args((PipelineConfig, RunOptions), argv, prog=f"python -m data_prep {command}",
                                  description=COMMANDS[command], path_keys=PATH_KEYS, space_values=True)
        if command == "report":
            reports = collect_reports(cfg)
            if not reports:
                raise PipelineError(f"{cfg.root}: no finished run to report on")
            print(format_table(reports))
            return 0
        if command == "status":
            # Lazy: executors imports datatrove's Ray and Slurm executors (~0.3 s, the optional `data` extra).
            from data_prep.executors import format_progress, progress

            print(format_progress(progress(cfg, list(STEPS))))
            return 0
        for index in options.shard_index:
            if not 0 <= index < cfg.num_shards:
                raise ConfigError(f"shard_index: {index} is outside 0..{cfg.num_shards - 1}")
        if options.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {options.workers}")
        steps = list(STEPS) if command == "run" else [command]
        run_pipeline(cfg, steps, options.shard_index or None, options.workers)
    except (ConfigError, DataError, PipelineError) as err:
        return report_error(err)
    except KeyboardInterrupt:
        print("stopped by Ctrl-C: finished shards and steps are kept; the same command goes on from there",
              file=sys.stderr, flush=True)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
