"""Whole-pipeline speed on 2 CPU cores: Ember's `data_prep run` against datatrove's equivalent pipeline, and
Ember's local executor against its Ray executor.

1. `ember_vs_datatrove`: the same JSON-lines corpus (English prose from the interpreter: each stdlib module's
   docstrings as one document, and the pydoc topics; written once) through
   - Ember: `python -m data_prep run` with the four text filters (Gopher quality and repetition, C4, FineWeb),
     MinHash near-duplicate dedup (exact dedup, cleaning, PII, split and tokenizer training off; the
     tokenizer is given), tokenize + pack; `--workers` processes over `--shards` shards.
   - datatrove: `JsonlReader` -> the same four filters (datatrove's own classes, default thresholds, which
     Ember's defaults copy) -> `MinhashDedupSignature` / `Buckets` / `Cluster` / `Filter` (Ember's MinHash
     settings: 5-grams, 14 buckets x 8 hashes; sha1 hashes, because datatrove 0.10.1's xxhash path fails
     with the installed xxhash) -> `DocumentTokenizer` (same tokenizer, EOS after each document), each
     stage a `LocalPipelineExecutor` with `--workers` workers over `--shards` tasks.
   Both in fresh processes, alternating, `--rounds` times; reported: seconds and documents in per second,
   and the ratio datatrove seconds / Ember seconds (> 1: Ember is faster per document).
2. `local_vs_ray`: `data_prep run --config recipes/configs/data/stdlib.yaml` (`--max_docs` documents) with
   `--workers 2` against `--executor ray --ray.num_cpus=2` (a local Ray instance started by the run,
   included in its time), alternating, `--rounds` times; outputs compared byte for byte.

Only time this on an otherwise idle machine: the 1-minute load average before and after each run is recorded.

    .venv/bin/python benchmarks/bench_pipeline_engines.py --rounds 3
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name  # noqa: E402
from data_prep.config import TokenizerConfig  # noqa: E402
from data_prep.sources import stdlib_files  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402

STDLIB_CONFIG = REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "pipeline_engines_cpu.json"
DOCUMENTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def write_corpus(directory: Path, files: int, limit: int | None) -> int:
    """English prose from the interpreter: per stdlib module, its docstrings (module, classes, functions) joined
    as one document, and the pydoc topics; at most `limit` documents, in `files` JSON-lines files (one per
    shard, so both pipelines split the work the same way). Returns the number of documents."""

    paths, topics = stdlib_files()
    texts = []
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, DOCUMENTED))]
        docstrings = [d for d in map(ast.get_docstring, nodes) if d]
        if docstrings:
            texts.append((str(path), "\n\n".join(docstrings)))
    texts += [(f"topic:{name}", text) for name, text in topics.items()]
    texts = texts[:limit]
    directory.mkdir(parents=True)
    for part in range(files):
        lines = [json.dumps({"text": text, "id": name}) + "\n" for name, text in texts[part::files]]
        (directory / f"part_{part:02d}.jsonl").write_text("".join(lines), encoding="utf-8")
    return len(texts)


def ember_config(corpus: Path, tokenizer: Path, output: Path, shards: int) -> Path:
    import yaml

    config = {
        "output_dir": str(output), "num_shards": shards, "validation_fraction": 0.0, "max_doc_bytes": 10**9,
        "sources": [{"name": "corpus", "paths": [str(corpus / "*.jsonl")], "kind": "text"}],
        # The word counts of datatrove's filters (spaCy tokens), so both pipelines make the same decisions.
        "filters": {"word_tokenizer": "spacy"},
        "clean": {"unicode_form": "none", "normalize_whitespace": False},
        "pii": {"enabled": False},
        "dedup": {"exact": False},
        "tokenizer": {"path": str(tokenizer)},
        "pack": {"seq_len": 1024},
    }
    path = output.parent / "ember.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Run as a script of its own, the work under the main guard (datatrove's default start method, forkserver,
# imports __main__).
DATATROVE_SCRIPT = r'''
import sys

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline import dedup, filters
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig


def main(corpus, tokenizer, out, shards, workers):
    minhash = dedup.minhash.MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="sha1"), n_grams=5,
                                          num_buckets=14, hashes_per_bucket=8)

    def local(pipeline, name, tasks=shards):
        # fork: the workers are children of this process, so the parent's CPU accounting includes them
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=f"{out}/logs/{name}", start_method="fork")

    local([JsonlReader(corpus, text_key="text", id_key="id"), filters.GopherRepetitionFilter(),
           filters.GopherQualityFilter(), filters.C4QualityFilter(filter_no_terminal_punct=False),
           filters.FineWebQualityFilter(), JsonlWriter(f"{out}/filtered")], "filter").run()
    local([JsonlReader(f"{out}/filtered"), dedup.MinhashDedupSignature(f"{out}/signatures", config=minhash)],
          "signatures").run()
    local([dedup.MinhashDedupBuckets(f"{out}/signatures", f"{out}/buckets", config=minhash)], "buckets",
          tasks=minhash.num_buckets).run()
    local([dedup.MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=minhash)], "cluster",
          tasks=1).run()
    local([JsonlReader(f"{out}/filtered"), dedup.MinhashDedupFilter(f"{out}/remove_ids"),
           DocumentTokenizer(f"{out}/tokens", tokenizer_name_or_path=f"{tokenizer}/tokenizer.json",
                             eos_token="<|endoftext|>", shuffle_documents=False)], "tokenize").run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
'''


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path) -> dict:
    """Wall seconds, and CPU seconds of the command and every process under it that was waited for (on a
    shared machine the wall time includes time lost to other users; the CPU time does not. A Ray worker is not
    a descendant of the run, so for Ray only the wall time means anything)."""
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), children_cpu_s()
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if result.returncode != 0:
        raise SystemExit(f"error: {shlex.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")
    return {"seconds": seconds, "cpu_s": cpu, "load_1m_before": load, "load_1m_after": os.getloadavg()[0]}


def train_tokenizer_once(corpus: Path, directory: Path) -> Path:

    parts = sorted(corpus.glob("*.jsonl"))
    texts = (json.loads(line)["text"] for part in parts for line in part.read_text(encoding="utf-8").splitlines())
    train_tokenizer(texts, TokenizerConfig(vocab_size=8192, train_bytes=4_000_000), directory)
    return directory


def ember_vs_datatrove(args: argparse.Namespace, work: Path) -> dict:
    corpus = work / "corpus"
    documents = write_corpus(corpus, args.shards, args.corpus_docs)
    tokenizer = train_tokenizer_once(corpus, work / "tokenizer")
    script = work / "datatrove_pipeline.py"
    script.write_text(DATATROVE_SCRIPT)
    rounds = []
    for index in range(args.rounds):
        record = {}
        for name in (("ember", "datatrove") if index % 2 == 0 else ("datatrove", "ember")):
            out = work / f"{name}-{index}" / "out"
            out.parent.mkdir(parents=True)
            if name == "ember":
                config = ember_config(corpus, tokenizer, out, args.shards)
                command = [sys.executable, "-m", "data_prep", "run", "--config", str(config),
                           "--workers", str(args.workers)]
            else:
                command = [sys.executable, str(script), str(corpus), str(tokenizer), str(out), str(args.shards),
                           str(args.workers)]
            record[name] = timed(command, REPO_ROOT)
            if name == "ember":
                summary = json.loads((out / "report.json").read_text())
                record[name]["documents_out"] = summary["records"]["total"]["kept"]
                record[name]["tokens"] = summary["tokens_train"]["num_tokens"]
            else:
                record[name]["tokens"] = sum(p.stat().st_size for p in (out / "tokens").glob("*.ds")) // 2
            shutil.rmtree(out.parent)
        record["datatrove_over_ember"] = record["datatrove"]["seconds"] / record["ember"]["seconds"]
        record["datatrove_over_ember_cpu"] = record["datatrove"]["cpu_s"] / record["ember"]["cpu_s"]
        print(f"  round {index + 1}: ember {record['ember']['seconds']:.1f} s ({record['ember']['cpu_s']:.1f} s CPU), "
              f"datatrove {record['datatrove']['seconds']:.1f} s ({record['datatrove']['cpu_s']:.1f} s CPU), ratio "
              f"{record['datatrove_over_ember']:.2f} (CPU {record['datatrove_over_ember_cpu']:.2f})", flush=True)
        rounds.append(record)
    medians = {name: statistics.median(r[name]["seconds"] for r in rounds) for name in ("ember", "datatrove")}
    cpu = {name: statistics.median(r[name]["cpu_s"] for r in rounds) for name in ("ember", "datatrove")}
    return {"documents_in": documents, "corpus_bytes": sum(p.stat().st_size for p in corpus.glob("*.jsonl")),
            "rounds": rounds, "median_s": medians, "median_cpu_s": cpu,
            "docs_per_s": {k: documents / v for k, v in medians.items()},
            "docs_per_cpu_s": {k: documents / v for k, v in cpu.items()},
            "datatrove_over_ember_of_medians": medians["datatrove"] / medians["ember"],
            "datatrove_over_ember_cpu_of_medians": cpu["datatrove"] / cpu["ember"]}


def same_outputs(a: Path, b: Path) -> bool:
    """Every data file equal byte for byte (executor logs, the config copy and report.json's timings aside)."""
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                      and p.relative_to(root).parts[0] != "executor"
                      and p.name not in ("pipeline_config.yaml", "report.json"))
    return files(a) == files(b) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files(a))


def local_vs_ray(args: argparse.Namespace, work: Path) -> dict:
    rounds = []
    for index in range(args.rounds):
        record, outs = {}, {}
        for name in (("local", "ray") if index % 2 == 0 else ("ray", "local")):
            outs[name] = work / f"{name}-{index}"
            command = [sys.executable, "-m", "data_prep", "run", "--config", str(STDLIB_CONFIG),
                       f"--output_dir={outs[name]}", f"--sources.0.max_docs={args.max_docs}",
                       f"--num_shards={args.shards}"]
            command += ["--workers=2"] if name == "local" else ["--executor=ray", "--ray.num_cpus=2"]
            record[name] = timed(command, REPO_ROOT)
        record["identical_outputs"] = same_outputs(outs["local"], outs["ray"])
        record["ray_over_local"] = record["ray"]["seconds"] / record["local"]["seconds"]
        for out in outs.values():
            shutil.rmtree(out)
        print(f"  round {index + 1}: local {record['local']['seconds']:.1f} s, ray {record['ray']['seconds']:.1f} s, "
              f"ratio {record['ray_over_local']:.2f}, identical {record['identical_outputs']}", flush=True)
        rounds.append(record)
    medians = {name: statistics.median(r[name]["seconds"] for r in rounds) for name in ("local", "ray")}
    return {"max_docs": args.max_docs, "shards": args.shards, "rounds": rounds, "median_s": medians,
            "ray_over_local_of_medians": medians["ray"] / medians["local"],
            "ray_overhead_s": medians["ray"] - medians["local"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    # Underscores as every Ember command; hyphenated aliases for the recorded commands.
    parser.add_argument("--max_docs", "--max-docs", type=int, default=2000, help="stdlib documents for local vs ray")
    parser.add_argument("--corpus_docs", "--corpus-docs", type=int, default=None,
                        help="cap the ember vs datatrove corpus")
    parser.add_argument("--only", choices=["ember_vs_datatrove", "local_vs_ray"], default=None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    record = {"benchmark": "bench_pipeline_engines",
              "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv] if argv is None else [sys.argv[0], *argv]),
              "machine": {"cpu_model": cpu_model_name(), "cores_available": available_cores(),
                          "platform": platform.platform(), "python": platform.python_version()},
              "load_1m_at_start": os.getloadavg()[0]}
    print(f"machine: {record['machine']['cpu_model']} | {record['machine']['cores_available']} cores | "
          f"load {record['load_1m_at_start']:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for name, function in (("ember_vs_datatrove", ember_vs_datatrove), ("local_vs_ray", local_vs_ray)):
            if args.only in (None, name):
                print(f"{name}:")
                work = Path(tmp) / name
                work.mkdir()
                record[name] = function(args, work)
    record["load_1m_at_end"] = os.getloadavg()[0]
    if "ember_vs_datatrove" in record:
        r = record["ember_vs_datatrove"]
        print(f"ember vs datatrove: {r['docs_per_s']['ember']:.1f} vs {r['docs_per_s']['datatrove']:.1f} docs/s in; "
              f"datatrove/ember time {r['datatrove_over_ember_of_medians']:.2f}, CPU time "
              f"{r['datatrove_over_ember_cpu_of_medians']:.2f}")
    if "local_vs_ray" in record:
        r = record["local_vs_ray"]
        print(f"local vs ray: {r['median_s']['local']:.1f} vs {r['median_s']['ray']:.1f} s; "
              f"ray/local {r['ray_over_local_of_medians']:.2f} (+{r['ray_overhead_s']:.1f} s)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
