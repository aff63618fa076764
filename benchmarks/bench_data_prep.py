"""CPU speed and memory of Ember's tokenize + pack step against the `datasets.map` recipe of run_clm.

Same corpus, same tokenizer, one run (corpus: the readable, non-empty UTF-8 standard-library `.py` files,
sorted by path, optionally capped at `--max_mb`; tokenizer: a byte-level BPE trained here, or `--tokenizer`):

1. Throughput of documents -> fixed-length training blocks on disk, `--rounds` interleaved rounds; and, in the
   same rounds, the raw rate of the tokenizer (`encode_batch_fast` on the same documents in batches of 1000,
   ids read out): the ratio raw seconds / Ember seconds is what packing keeps of the tokenizer's speed.
   ember:   `pack_documents(docs, tokenizer, prefix, PackConfig(seq_len))`, writing a real packed shard.
   run_clm: `Dataset.from_generator` (Arrow cache in a fresh temporary directory; timed apart as `ingest_s`),
            then `.map(tokenize, batched=True, remove_columns=["text"])` with `tokenizer(batch["text"])`, then
            `.map(group_into_blocks, batched=True)`: each batch's `input_ids` / `attention_mask` concatenated
            and cut into `--seq_len` blocks, the batch's tail dropped (no `labels` copy: only makes it faster).
   Before timing, both run once and must give the same token ids document by document (Ember's one EOS per
   document taken off); otherwise nothing is reported. Reported: median / IQR seconds, input MB/s (UTF-8
   bytes / 1e6 / s), tokens/s (EOS not counted, so both divide the same number), speed ratio Ember / run_clm.
2. Peak RSS (`ru_maxrss`) at each of `--scales` times the corpus, each path and scale in a fresh process of
   this script (`--measure_one`); the corpus is streamed, re-read from disk `scale` times, into
   `pack_documents` or `Dataset.from_generator` (for run_clm at every scale, so its scales compare alike).
3. MinHash signature throughput (`data_prep.dedup.signature_throughput`, default `DedupConfig`), per round.

`--threads N` sets RAYON_NUM_THREADS and TOKENIZERS_PARALLELISM for both paths and the measurement processes;
without it the environment is left alone and the record says what tokenizers will use. `Dataset.map` keeps
`num_proc=None` (in this process): in datasets 5, `num_proc=1` maps in a one-worker pool with tokenizer
parallelism switched off, which would change both the thread count and whose memory is measured.

    .venv/bin/python benchmarks/bench_data_prep.py                        # whole stdlib, 5 rounds, 1x and 10x
    .venv/bin/python benchmarks/bench_data_prep.py --threads 1 --max_mb 8 --rounds 3

Prints a table and writes the record (machine, command line, corpus, token check, raw per-round numbers,
memory measurements, summary) as JSON to `--output`. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
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
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow
import pyarrow.compute as pc
import tokenizers
import transformers
from bench_common import available_cores, cpu_model_name, quartiles

from data_prep.config import ConfigError, DedupConfig, PackConfig, TokenizerConfig
from data_prep.dedup import signature_throughput
from data_prep.packing import pack_documents
from data_prep.sources import stdlib_files
from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "data_prep_cpu.json"
METHODS = ("ember", "run_clm")
BATCH_DOCS = 1000  # PackConfig.batch_docs and the default batch_size of Dataset.map
MEASUREMENT_TAG = "MEASUREMENT "
# Linux carries the spawning process's peak RSS into a child's ru_maxrss across vfork+exec (exec records the
# peak of the address space it replaces, which after vfork is the parent's). A small Python in between makes
# that inherited peak its own ~10 MiB instead of this process's hundreds.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
FALSE_VALUES = ("", "off", "false", "f", "no", "n", "0")  # what tokenizers reads as TOKENIZERS_PARALLELISM off


# --------------------------------------------------------------------------------------------------------------------
# Command line and environment
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time Ember's tokenize+pack against run_clm-style datasets.map on CPU; measure peak RSS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Underscores as every Ember command; the hyphenated spellings stay as aliases, for the recorded commands.
    parser.add_argument("--seq_len", "--seq-len", type=int, default=1024,
                        help="tokens per training block (run_clm block_size)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each path once per round)")
    parser.add_argument("--max_mb", "--max-mb", type=float, default=None,
                        help="cap the corpus at about this many MB (1e6 B)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="corpus multiples for peak RSS")
    parser.add_argument("--threads", type=int, default=None,
                        help="tokenizer threads for both paths (default: leave the environment, tokenizers decides)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="saved tokenizer directory to use")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=8192,
                        help="vocabulary of the tokenizer trained here")
    parser.add_argument("--tokenizer_train_mb", "--tokenizer-train-mb", type=float, default=4.0,
                        help="MB of the corpus to train it on")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary shards and caches go")
    parser.add_argument("--target_speedup", "--target-speedup", type=float, default=1.5,
                        help="wanted Ember / run_clm speed")
    parser.add_argument("--target_rss_growth", "--target-rss-growth", type=float, default=1.2,
                        help="allowed Ember RSS growth")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result path")
    # One memory measurement in this process (the main run starts these itself).
    parser.add_argument("--measure_one", "--measure-one", nargs=2, metavar=("METHOD", "SCALE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.seq_len, args.rounds, args.vocab_size, *args.scales) < 1:
        parser.error("--seq_len, --rounds, --vocab_size and --scales must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if (args.max_mb is not None and args.max_mb <= 0) or args.tokenizer_train_mb <= 0:
        parser.error("--max_mb and --tokenizer_train_mb must be positive")
    if args.measure_one:
        method, scale = args.measure_one
        if method not in METHODS or not scale.isdigit() or int(scale) < 1 or args.tokenizer is None:
            parser.error(f"--measure_one takes one of {METHODS} and a positive scale, and needs --tokenizer")
    return args


def apply_threads(threads: int | None) -> dict[str, Any]:
    """Set (or just read) the tokenizers thread settings; return what both paths will run with.

    Rust's thread pool is built on first use, so setting the variables here, before any tokenization, works.
    """
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    rayon = os.environ.get("RAYON_NUM_THREADS")
    if parallelism is not None and parallelism.strip().lower() in FALSE_VALUES:
        effective = 1
    elif rayon and rayon.isdigit() and int(rayon) > 0:
        effective = int(rayon)
    else:
        effective = available_cores()  # the pool's default: one thread per core this process may use
    return {"requested": threads if threads is not None else "default (environment unchanged)",
            "TOKENIZERS_PARALLELISM": parallelism, "RAYON_NUM_THREADS": rayon, "effective": effective}


# --------------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------------------------------


def select_corpus(max_mb: float | None) -> tuple[list[Path], dict[str, int]]:
    """Readable, non-empty UTF-8 stdlib `.py` files in path order, up to `max_mb` MB; and what was skipped."""
    files, _ = stdlib_files()
    limit = None if max_mb is None else int(max_mb * 1e6)
    chosen: list[Path] = []
    skipped = {"unreadable_or_non_utf8": 0, "empty": 0}
    total = 0
    for path in files:
        if limit is not None and total >= limit:
            break
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped["unreadable_or_non_utf8"] += 1
            continue
        if not text.strip():
            skipped["empty"] += 1
            continue
        chosen.append(path)
        total += len(data)
    if not chosen:
        raise SystemExit("error: no readable standard-library .py file found")
    return chosen, skipped


def read_texts(paths: list[str] | list[Path], repeats: int = 1) -> Iterator[str]:
    """The files' texts, re-read from disk `repeats` times: a stream that is never held in memory at once."""
    for _ in range(repeats):
        for path in paths:
            yield Path(path).read_text(encoding="utf-8")


def text_records(paths: list[str], repeats: int) -> Iterator[dict[str, str]]:
    """Generator for `Dataset.from_generator` (module level and plain arguments, so datasets can hash it)."""
    for text in read_texts(paths, repeats):
        yield {"text": text}


def as_documents(texts: Iterator[str] | list[str]) -> Iterator[dict[str, str]]:
    for text in texts:
        yield {"text": text, "kind": "code", "source": "stdlib"}


def open_tokenizer(directory: Path):
    try:
        return load_tokenizer(directory)
    except ConfigError as err:
        raise SystemExit(f"error: --tokenizer {err}") from None


def prepare_tokenizer(args: argparse.Namespace, texts: list[str], scratch: Path) -> tuple[Any, Path, dict[str, Any]]:
    if args.tokenizer is not None:
        return open_tokenizer(args.tokenizer), args.tokenizer, {"source": str(args.tokenizer)}
    cfg = TokenizerConfig(vocab_size=args.vocab_size, train_bytes=int(args.tokenizer_train_mb * 1e6))
    directory = scratch / "tokenizer"
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts, cfg, directory)
    info = {"source": f"trained here: byte-level BPE on the first {cfg.train_bytes} bytes of the corpus",
            "train_s": time.perf_counter() - start}
    return tokenizer, directory, info


# --------------------------------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------------------------------


def ember_pack(docs, tokenizer, workdir: Path, seq_len: int) -> dict[str, Any]:
    """Tokenize and pack into one shard under `workdir`; returns the shard metadata."""
    return pack_documents(docs, tokenizer, workdir / "shard_00000", PackConfig(seq_len=seq_len))


def group_into_blocks(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Join the batch's sequences column by column and cut them into `block_size` pieces; drop the tail."""
    joined = {name: list(chain.from_iterable(sequences)) for name, sequences in batch.items()}
    usable = len(joined["input_ids"]) // block_size * block_size
    return {name: [values[i:i + block_size] for i in range(0, usable, block_size)] for name, values in joined.items()}


def text_dataset(paths: list[Path], repeats: int, cache_dir: Path) -> datasets.Dataset:
    return datasets.Dataset.from_generator(text_records, features=TEXT_FEATURES, cache_dir=str(cache_dir),
                                           gen_kwargs={"paths": [str(p) for p in paths], "repeats": repeats})


def run_clm_map(raw: datasets.Dataset, tokenizer, block_size: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    def tokenize(batch: dict[str, list[str]]):
        return tokenizer(batch["text"])

    tokenized = raw.map(tokenize, batched=True, batch_size=BATCH_DOCS, remove_columns=["text"])
    grouped = tokenized.map(group_into_blocks, batched=True, batch_size=BATCH_DOCS,
                            fn_kwargs={"block_size": block_size})
    return tokenized, grouped


def dataset_token_count(tokenized: datasets.Dataset) -> int:
    return int(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0)


def check_same_tokens(paths: list[Path], texts: list[str], tokenizer, seq_len: int, workdir: Path) -> dict[str, Any]:
    """Run both paths once and compare their tokens document by document (EOS removed from Ember's stream)."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="check-") as tmp:
        metadata = ember_pack(as_documents(texts), tokenizer, Path(tmp) / "ember", seq_len)
        prefix = Path(tmp) / "ember" / "shard_00000"
        stream = np.fromfile(prefix.with_name(prefix.name + ".bin"), dtype=metadata["dtype"])
        ends = np.load(prefix.with_name(prefix.name + ".idx.npy")).astype(np.int64)
        is_eos = stream == metadata["eos_id"]
        tokenized, grouped = run_clm_map(text_dataset(paths, 1, Path(tmp) / "cache"), tokenizer, seq_len)
        ids = tokenized.data.column("input_ids").combine_chunks()
        run_clm_lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        run_clm_ids = ids.flatten().to_numpy(zero_copy_only=False)
        ember_lengths = np.diff(ends, prepend=0) - 1  # each document's tokens, its EOS taken off
        check = {
            "documents": len(texts),
            "ember_documents": metadata["num_documents"],
            "ember_tokens_with_eos": metadata["num_tokens"],
            "ember_eos_tokens": int(is_eos.sum()),
            "ember_tokens": metadata["num_tokens"] - metadata["num_documents"],
            "run_clm_documents": len(tokenized),
            "run_clm_tokens": dataset_token_count(tokenized),
            "ember_blocks": metadata["num_blocks"],
            "run_clm_blocks": len(grouped),
            "run_clm_cache_files": len(tokenized.cache_files) + len(grouped.cache_files),  # maps wrote Arrow files
            "eos_only_between_documents": bool(is_eos.sum() == len(ends) and is_eos[ends - 1].all()),
            "same_lengths_per_document": bool(np.array_equal(ember_lengths, run_clm_lengths)),
            "same_token_ids": bool(np.array_equal(stream[~is_eos].astype(np.int64), run_clm_ids.astype(np.int64))),
        }
        del tokenized, grouped, ids  # release the memory-mapped cache files before the directory goes
    check["ok"] = (check["documents"] == check["ember_documents"] == check["run_clm_documents"]
                   and check["ember_tokens"] == check["run_clm_tokens"] and check["run_clm_cache_files"] >= 2
                   and check["eos_only_between_documents"] and check["same_lengths_per_document"]
                   and check["same_token_ids"])
    return check


# --------------------------------------------------------------------------------------------------------------------
# Throughput rounds
# --------------------------------------------------------------------------------------------------------------------


def time_ember(texts: list[str], tokenizer, seq_len: int, workdir: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ember-") as tmp:
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        ember_pack(as_documents(texts), tokenizer, Path(tmp), seq_len)
        return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def time_encode(texts: list[str], tokenizer) -> dict[str, float]:
    """The raw tokenizer rate: `encode_batch_fast` on the same documents in batches of BATCH_DOCS, ids read out."""
    backend = tokenizer.backend_tokenizer
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), BATCH_DOCS):
        for encoding in backend.encode_batch_fast(texts[i:i + BATCH_DOCS], add_special_tokens=False):
            encoding.ids  # noqa: B018 - the packer needs the ids as Python ints too
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def time_run_clm(paths: list[Path], tokenizer, seq_len: int, workdir: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="run_clm-") as tmp:
        gc.collect()
        start = time.perf_counter()
        raw = text_dataset(paths, 1, Path(tmp))
        ingest = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        tokenized, grouped = run_clm_map(raw, tokenizer, seq_len)
        seconds = time.perf_counter() - start
        del raw, tokenized, grouped
    return {"seconds": seconds, "ingest_s": ingest}


def run_rounds(paths: list[Path], texts: list[str], tokenizer, args: argparse.Namespace, workdir: Path,
               corpus_bytes: int, tokens: int) -> list[dict[str, Any]]:
    rounds = []
    for index in range(args.rounds):
        order = METHODS if index % 2 == 0 else METHODS[::-1]
        record: dict[str, Any] = {"round": index, "order": list(order)}
        for method in order:
            if method == "ember":
                result = time_ember(texts, tokenizer, args.seq_len, workdir)
            else:
                result = time_run_clm(paths, tokenizer, args.seq_len, workdir)
            result["mb_per_s"] = corpus_bytes / 1e6 / result["seconds"]
            result["tokens_per_s"] = tokens / result["seconds"]
            record[method] = result
        record["speed_ratio"] = record["run_clm"]["seconds"] / record["ember"]["seconds"]
        record["encode"] = time_encode(texts, tokenizer)
        record["pack_vs_encode"] = record["encode"]["seconds"] / record["ember"]["seconds"]
        # With one tokenizer thread the work runs in this process: CPU seconds do not count time lost to other
        # processes on a shared machine, wall seconds do.
        record["pack_vs_encode_cpu"] = record["encode"]["cpu_s"] / record["ember"]["cpu_s"]
        docs_per_s = signature_throughput(texts, DedupConfig())
        record["minhash"] = {"docs_per_s": docs_per_s, "seconds": len(texts) / docs_per_s}
        rounds.append(record)
        print(f"  round {index + 1:2d}/{args.rounds}  ember {record['ember']['seconds']:7.2f} s  "
              f"run_clm {record['run_clm']['seconds']:7.2f} s (+{record['run_clm']['ingest_s']:.2f} s ingest)  "
              f"ratio {record['speed_ratio']:.2f}  encode {record['encode']['seconds']:.2f} s "
              f"(pack/encode speed {record['pack_vs_encode']:.2f}, CPU time {record['pack_vs_encode_cpu']:.2f})  "
              f"minhash {docs_per_s:,.0f} docs/s", flush=True)
    return rounds


def summarise_rounds(rounds: list[dict[str, Any]], corpus_bytes: int, tokens: int, documents: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in METHODS:
        seconds = [r[method]["seconds"] for r in rounds]
        q1, median, q3 = quartiles(seconds)
        summary[method] = {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": min(seconds),
                           "mb_per_s": corpus_bytes / 1e6 / median, "tokens_per_s": tokens / median}
    summary["run_clm"]["median_ingest_s"] = statistics.median(r["run_clm"]["ingest_s"] for r in rounds)
    r_q1, r_median, r_q3 = quartiles([r["speed_ratio"] for r in rounds])
    summary["speed_ratio_of_medians"] = summary["run_clm"]["median_s"] / summary["ember"]["median_s"]
    summary["median_round_speed_ratio"] = r_median
    summary["round_speed_ratio_q1"], summary["round_speed_ratio_q3"] = r_q1, r_q3
    encode_s = statistics.median(r["encode"]["seconds"] for r in rounds)
    summary["encode"] = {"median_s": encode_s, "mb_per_s": corpus_bytes / 1e6 / encode_s}
    summary["pack_vs_encode_of_medians"] = encode_s / summary["ember"]["median_s"]
    summary["median_round_pack_vs_encode"] = statistics.median(r["pack_vs_encode"] for r in rounds)
    summary["pack_vs_encode_cpu_of_medians"] = (statistics.median(r["encode"]["cpu_s"] for r in rounds)
                                                / statistics.median(r["ember"]["cpu_s"] for r in rounds))
    minhash_s = statistics.median(r["minhash"]["seconds"] for r in rounds)
    summary["minhash"] = {"median_s": minhash_s, "docs_per_s": documents / minhash_s,
                          "mb_per_s": corpus_bytes / 1e6 / minhash_s}
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per (method, scale)
# --------------------------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def proc_status_mib() -> dict[str, float]:
    """Linux only: peak RSS of this address space (VmHWM, a cross-check of ru_maxrss) and the anonymous vs
    file-backed (memory-mapped files) resident memory right now."""
    status: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                status[key] = int(value.split()[0]) / 2**10
    except OSError:
        pass
    return status


def measure_one(args: argparse.Namespace) -> int:
    method, scale = args.measure_one[0], int(args.measure_one[1])
    tokenizer = open_tokenizer(args.tokenizer)
    paths, _ = select_corpus(args.max_mb)
    workdir = args.workdir or Path(tempfile.gettempdir())
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"rss-{method}-") as tmp:
        start = time.perf_counter()
        if method == "ember":
            metadata = ember_pack(as_documents(read_texts(paths, scale)), tokenizer, Path(tmp), args.seq_len)
            documents, tokens = metadata["num_documents"], metadata["num_tokens"] - metadata["num_documents"]
            status = proc_status_mib()
        else:
            tokenized, grouped = run_clm_map(text_dataset(paths, scale, Path(tmp)), tokenizer, args.seq_len)
            documents, tokens = len(tokenized), dataset_token_count(tokenized)
            status = proc_status_mib()
            del tokenized, grouped
        seconds = time.perf_counter() - start
    result = {"method": method, "scale": scale, "documents": documents, "tokens": tokens, "seconds": seconds,
              "peak_rss_mib": peak_rss_mib(), "peak_rss_before_work_mib": before, "proc_status_at_end_mib": status}
    print(MEASUREMENT_TAG + json.dumps(result), flush=True)
    return 0


def measure_memory(args: argparse.Namespace, tokenizer_dir: Path, workdir: Path) -> list[dict[str, Any]]:
    results = []
    for scale in args.scales:
        for method in METHODS:
            command = [sys.executable, "-c", LAUNCHER,
                       sys.executable, str(Path(__file__).resolve()), "--measure_one", method, str(scale),
                       "--tokenizer", str(tokenizer_dir), "--seq_len", str(args.seq_len), "--workdir", str(workdir)]
            if args.max_mb is not None:
                command += ["--max_mb", repr(args.max_mb)]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(MEASUREMENT_TAG)]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"error: memory measurement {method} x{scale} failed:\n{done.stderr[-2000:]}")
            result = json.loads(lines[-1][len(MEASUREMENT_TAG):])
            print(f"  {method:<8} x{scale:<3} peak RSS {result['peak_rss_mib']:8.1f} MiB "
                  f"({result['seconds']:.1f} s, {result['documents']} docs)", flush=True)
            results.append(result)
    return results


def summarise_memory(measurements: list[dict[str, Any]], scales: list[int]) -> dict[str, Any]:
    smallest, largest = min(scales), max(scales)
    summary: dict[str, Any] = {}
    for method in METHODS:
        runs = {m["scale"]: m for m in measurements if m["method"] == method}
        peaks = {scale: run["peak_rss_mib"] for scale, run in runs.items()}
        # The peak after imports and tokenizer loading is the same at every scale; what the work adds on top of
        # it is the part that could grow with the corpus.
        above = {str(s): peaks[s] - runs[s]["peak_rss_before_work_mib"] for s in sorted(peaks)}
        summary[method] = {"peak_rss_mib": {str(s): peaks[s] for s in sorted(peaks)},
                           "peak_above_startup_mib": above, "growth": peaks[largest] / peaks[smallest]}
    summary["smallest_scale"], summary["largest_scale"] = smallest, largest
    smallest_docs = min(m["documents"] for m in measurements)
    if smallest_docs < BATCH_DOCS:
        summary["note"] = (f"the x{smallest} stream has {smallest_docs} documents, less than one batch of "
                           f"{BATCH_DOCS}: larger scales also fill their batches, so growth overstates corpus effects")
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def machine_info(threads: dict[str, Any]) -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor(), "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(), "cpus_available": available_cores(), "python": platform.python_version(),
        "tokenizers": tokenizers.__version__, "datasets": datasets.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__,
        "tokenizer_threads": threads,
    }


def print_table(summary: dict[str, Any], memory: dict[str, Any], args: argparse.Namespace) -> None:
    header = f"{'path':<8} {'median s':>10} {'IQR s':>17} {'MB/s':>9} {'tokens/s':>12}"
    print(header)
    print("-" * len(header))
    for method in METHODS:
        s = summary[method]
        print(f"{method:<8} {s['median_s']:10.2f} {s['q1_s']:8.2f}-{s['q3_s']:<8.2f} {s['mb_per_s']:9.2f} "
              f"{s['tokens_per_s']:12,.0f}")
    print("-" * len(header))
    met = summary["speed_ratio_of_medians"] >= args.target_speedup
    print(f"speed ember/run_clm (of medians):       {summary['speed_ratio_of_medians']:.2f}  "
          f"(target >= {args.target_speedup}: {'met' if met else 'NOT met'})")
    print(f"speed ember/run_clm (median of rounds): {summary['median_round_speed_ratio']:.2f}  "
          f"(IQR {summary['round_speed_ratio_q1']:.2f}-{summary['round_speed_ratio_q3']:.2f})")
    print(f"run_clm Arrow ingest, not in its time:  {summary['run_clm']['median_ingest_s']:.2f} s")
    print(f"tokenize+pack / raw encode_batch_fast:  {summary['pack_vs_encode_of_medians']:.2f}  "
          f"(median of rounds {summary['median_round_pack_vs_encode']:.2f}; raw {summary['encode']['mb_per_s']:.2f} "
          f"MB/s; target >= 0.9: {'met' if summary['pack_vs_encode_of_medians'] >= 0.9 else 'NOT met'})")
    print(f"  the same in CPU seconds (one thread):  {summary['pack_vs_encode_cpu_of_medians']:.2f}")
    print()
    small, large = memory["smallest_scale"], memory["largest_scale"]
    header = f"{'path':<8} " + " ".join(f"{'RSS x' + str(s):>18}" for s in args.scales) + f" {'growth':>8}"
    print(header + "   (peak RSS in MiB, fresh process each; in brackets: above the startup peak)")
    print("-" * len(header))
    for method in METHODS:
        peaks, above = memory[method]["peak_rss_mib"], memory[method]["peak_above_startup_mib"]
        cells = " ".join(f"{peaks[str(s)]:9.1f} ({above[str(s)]:6.1f})" for s in args.scales)
        print(f"{method:<8} {cells} {memory[method]['growth']:8.2f}")
    print("-" * len(header))
    flat = memory["ember"]["growth"] <= args.target_rss_growth
    print(f"ember RSS x{large}/x{small}: {memory['ember']['growth']:.2f} "
          f"(target <= {args.target_rss_growth}: {'met' if flat else 'NOT met'})")
    if "note" in memory:
        print(f"note: {memory['note']}")
    print()
    m = summary["minhash"]
    print(f"MinHash signatures (default DedupConfig): {m['docs_per_s']:,.0f} docs/s, {m['mb_per_s']:.2f} MB/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = apply_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # run_clm silences the "longer than model_max_length" warning too
    if args.measure_one:
        return measure_one(args)

    info = machine_info(threads)
    paths, skipped = select_corpus(args.max_mb)
    texts = list(read_texts(paths))
    corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
    workdir = args.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix="bench-data-prep-"))
    try:
        tokenizer, tokenizer_dir, tokenizer_info = prepare_tokenizer(args, texts, scratch)
        tokenizer_info.update(vocab_size=len(tokenizer), fingerprint=tokenizer_fingerprint(tokenizer))
        print(f"machine: {info['cpu_model']} | {info['cpus_available']} cores | tokenizers {info['tokenizers']} "
              f"({threads['effective']} threads) | datasets {info['datasets']} | transformers {info['transformers']}")
        print(f"corpus:  {len(texts)} stdlib files, {corpus_bytes / 1e6:.2f} MB | tokenizer vocab "
              f"{tokenizer_info['vocab_size']} | seq_len {args.seq_len} | rounds {args.rounds} | scales {args.scales}")

        check = check_same_tokens(paths, texts, tokenizer, args.seq_len, scratch)
        print(f"check:   ember {check['ember_tokens']:,} tokens (+{check['ember_eos_tokens']:,} EOS) vs run_clm "
              f"{check['run_clm_tokens']:,} tokens; ids equal per document: {check['same_token_ids']} "
              f"-> {'OK' if check['ok'] else 'FAIL'}")
        if not check["ok"]:
            print("error: the two paths did not see the same tokens; refusing to report timings\n"
                  + json.dumps(check, indent=2), file=sys.stderr)
            return 1
        tokens = check["ember_tokens"]

        load_before = os.getloadavg()
        print("throughput:")
        rounds = run_rounds(paths, texts, tokenizer, args, scratch, corpus_bytes, tokens)
        print("peak memory:")
        measurements = measure_memory(args, tokenizer_dir, scratch)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for m in measurements:
        expected = (m["scale"] * len(texts), m["scale"] * tokens)
        if (m["documents"], m["tokens"]) != expected:
            print(f"error: {m['method']} x{m['scale']} processed {m['documents']} docs / {m['tokens']} tokens, "
                  f"expected {expected[0]} / {expected[1]}", file=sys.stderr)
            return 1
    summary = summarise_rounds(rounds, corpus_bytes, tokens, len(texts))
    memory = summarise_memory(measurements, args.scales)
    print()
    print_table(summary, memory, args)
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")

    record = {
        "benchmark": "bench_data_prep",
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else [sys.argv[0], *argv]),
        "machine": info,
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        "settings": {
            "seq_len": args.seq_len, "rounds": args.rounds, "max_mb": args.max_mb, "scales": args.scales,
            "batch_docs": BATCH_DOCS, "map_num_proc": None, "workdir": str(workdir),
            "run_clm_labels_column": False, "run_clm_timed": "tokenize map + group map (Arrow ingest separate)",
            "memory_input": "stream re-reading the files `scale` times; run_clm via Dataset.from_generator",
            "dedup_config": "DedupConfig() defaults",
        },
        "corpus": {"source": "stdlib .py files", "files": len(paths), "documents": len(texts),
                   "bytes": corpus_bytes, "tokens": tokens, "skipped": skipped},
        "tokenizer": tokenizer_info,
        "token_check": check,
        "rounds": rounds,
        "memory": measurements,
        "summary": {
            "throughput": summary,
            "memory": memory,
            "target_speedup": args.target_speedup,
            "speedup_met": summary["speed_ratio_of_medians"] >= args.target_speedup,
            "target_rss_growth": args.target_rss_growth,
            "ember_rss_flat": memory["ember"]["growth"] <= args.target_rss_growth,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"saved:   {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
