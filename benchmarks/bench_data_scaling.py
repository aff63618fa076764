"""The data pipeline at the size users run it: the Linux kernel's source (Debian's linux-source, about 1.2 GB of C)
on 2 cores, Ember against datatrove, with the time and memory of each step against the corpus size.

Parts (`--parts`, all by default; the slices and the tokenizer are made once under `--work` and reused):

1. `engines`: nested slices of the kernel's code files (about 10 MB, 100 MB and all of them; a member is in a slice
   when a hash of its path falls under the slice's share, so each slice samples the whole tree) as JSON lines
   (zstd), 2 files each. Per slice, alternating, in fresh processes, `--workers` workers over 2 shards/tasks:
   - Ember: `python -m data_prep run`: NFC, code quality rules, PII (emails, public IPs), exact + MinHash dedup
     (numbers mapped to 0, as datatrove's MinHash does by default), pack with the given tokenizer (trained once
     here on the 100 MB slice: byte-level BPE, vocab 32000).
   - datatrove: `JsonlReader` -> an NFC formatter -> `PIIFormatter` (emails, public IPs) -> a `LambdaFilter` with
     the same code rules (Ember's `check_code`, so both make the same decisions: datatrove has no code filter) ->
     `JsonlWriter`; exact dedup (`ExactDedupSignature` / `ExactFindDedups` / `ExactDedupFilter` on the text
     lowercased with whitespace collapsed, as Ember hashes it; xxhash); MinHash (`MinhashDedupSignature` /
     `Buckets` / `Cluster` / `Filter`, Ember's settings: 5-grams, 14 bands x 8; sha1, because datatrove 0.10.1's
     xxhash path fails on str shingles) -> `DocumentTokenizer` (the same tokenizer, EOS after each document).
   Reported per run: wall and CPU seconds (the run and every process it waited for), peak RSS of the whole process
   tree (sampled every 0.2 s; the sum over processes, the largest single process apart), documents and tokens
   out; per step its seconds and peak tree RSS; how far the two dedups agree (documents each removes, both remove).
2. `tokenize`: on the 100 MB slice's filtered documents, one process, one thread: `encode_batch_fast` of the
   `tokenizers` library (batches of 1000, ids read out) against Ember's tokenize + pack (`pack_documents` with the
   saved tokenizer, tiktoken inside), interleaved; then Ember's pack step alone with 1 and with 2 workers.
3. `user`: `python -m data_prep run --config recipes/configs/data/linux.yaml --workers=2` as a user runs it (the
   .tar.xz read directly, the tokenizer trained on its 100 MB sample); then the same run killed with SIGKILL (the
   whole process group) at `--kill_fraction` of that time and run again: its outputs compared byte for byte with
   the uninterrupted run's (reports aside, which hold timings).

Only time this on an otherwise idle machine; the 1-minute load average before and after is recorded.

    .venv/bin/python benchmarks/bench_data_scaling.py                    # everything, about 1.5 hours on 2 cores
    .venv/bin/python benchmarks/bench_data_scaling.py --parts engines --sizes 10e6 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import glob
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model_name, save_record  # noqa: E402
from data_prep.config import CODE_EXTENSIONS, TokenizerConfig, load_config  # noqa: E402
from data_prep.dedup import load_removals  # noqa: E402
from data_prep.io import read_docs  # noqa: E402
from data_prep.sources import read_archive  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LINUX_CONFIG = REPO_ROOT / "recipes" / "configs" / "data" / "linux.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
FULL = 0.0  # --sizes value meaning "every code file"


# ---------------------------------------------------------------------------------------------
# Running a command: wall, CPU, the process tree's memory, and when each step ended
# ---------------------------------------------------------------------------------------------

class TreeMonitor(threading.Thread):
    """Samples the memory of a process and all its descendants: the summed RSS (pages shared between forked
    workers counted once per process, as `ps` would add them up) and the largest single RSS every `interval`
    seconds, and the summed PSS (shared pages split between their users: what the tree really holds) every
    `pss_every` samples, since reading it costs a few milliseconds per process."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every = psutil.Process(pid), interval, pss_every
        self.samples: list[tuple[float, int, int, int | None]] = []  # (seconds, tree RSS, largest RSS, tree PSS)
        self.stopped = threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            with_pss = len(self.samples) % self.pss_every == 0
            rss, pss = [], 0
            for process in processes:
                with contextlib.suppress(psutil.Error, OSError):  # ended between the listing and the reading
                    rss.append(process.memory_info().rss)
                    if with_pss:
                        pss += _pss_bytes(process.pid)
            if rss:
                self.samples.append((time.perf_counter() - self.start_time, sum(rss), max(rss),
                                     pss if with_pss else None))
            self.stopped.wait(self.interval)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        """Peaks between `start` and `end` seconds (a window with no sample takes the last sample before it)."""
        window = [s for s in self.samples if start <= s[0] <= end]
        window = window or [s for s in self.samples if s[0] <= end][-1:] or [(0.0, 0, 0, 0)]
        return {"tree_rss_mb": max(s[1] for s in window) / 1e6,
                "largest_process_rss_mb": max(s[2] for s in window) / 1e6,
                "tree_pss_mb": max((s[3] for s in window if s[3] is not None), default=0) / 1e6}


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_monitored(command: list[str], log: Path, kill_after: float | None = None, check: bool = True) -> dict[str, Any]:
    """Run `command` in its own process group; lines it prints are timestamped (step ends are read from them).
    With `kill_after`, the whole group gets SIGKILL after that many seconds (a planned kill, or a watchdog: a
    process pool whose worker the kernel killed for memory waits forever). With `check`, a failure stops here."""
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), children_cpu_s()
    lines: list[tuple[float, str]] = []
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        monitor = TreeMonitor(process.pid)
        monitor.start()
        if kill_after is not None:
            timer = threading.Timer(kill_after, lambda: os.killpg(process.pid, signal.SIGKILL))
            timer.start()
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            out.write(line)
            out.flush()
        code = process.wait()
        if kill_after is not None:
            timer.cancel()
    monitor.stopped.set()
    monitor.join()
    seconds, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if code != 0 and check:
        raise SystemExit(f"error: {shlex.join(command[:6])} ... failed (exit {code}); see {log}")
    return {"seconds": seconds, "cpu_s": cpu, "exit_code": code, **monitor.peak(),
            "load_1m_before": load, "load_1m_after": os.getloadavg()[0], "_lines": lines, "_monitor": monitor}


def step_curve(result: dict[str, Any], markers: dict[str, str]) -> dict[str, dict[str, float]]:
    """Seconds and peak tree RSS of each step, a step running from the end of the one before to its own end
    marker (the last printed line that starts with `markers[step]`)."""
    ends = {}
    for step, prefix in markers.items():
        times = [t for t, line in result["_lines"] if line.startswith(prefix)]
        if times:
            ends[step] = times[-1]
    curve, previous = {}, 0.0
    for step, end in sorted(ends.items(), key=lambda kv: kv[1]):
        curve[step] = {"seconds": end - previous, **result["_monitor"].peak(previous, end)}
        previous = end
    return curve


def public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# The corpus: slices of the kernel's code files, and one tokenizer for both pipelines
# ---------------------------------------------------------------------------------------------

def kernel_archive_or_none() -> Path | None:
    archives = sorted(glob.glob("/usr/src/linux-source-*.tar.xz"))
    return Path(archives[-1]) if archives else None


def kernel_archive() -> Path:
    archive = kernel_archive_or_none()
    if archive is None:
        raise SystemExit("error: no /usr/src/linux-source-*.tar.xz; run `make linux-corpus` first")
    return archive


def unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") / 2**64


def make_slices(work: Path, sizes: list[float], archive: Path) -> dict[str, dict[str, Any]]:
    """Write each slice once (2 JSON-lines.zst files); returns {name: {path, bytes, documents}}."""
    import zstandard


    slices = {slice_name(size): work / "slices" / slice_name(size) for size in sizes}
    info_path = work / "slices" / "slices.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    todo = [name for name in slices if info.get(name, {}).get("archive") != str(archive)]
    if not todo:
        return info
    kernel = load_config(LINUX_CONFIG).sources[0]  # the code files linux.yaml reads
    code = [e for e in kernel.extensions if e.lower() in map(str.lower, CODE_EXTENSIONS)]
    members = [(where, text) for where, text, _, reason in
               read_archive(archive, 10_000_000, code) if not reason and text is not None]
    members = [(where.split(":", 1)[1], text) for where, text in members]
    total = sum(len(text.encode()) for _, text in members)
    for name in todo:
        size = dict(zip(map(slice_name, sizes), sizes))[name]
        share = 1.0 if size == FULL else min(1.0, size / total)
        chosen = [(member, text) for member, text in members if unit_hash(member) < share]
        folder = slices[name]
        folder.mkdir(parents=True, exist_ok=True)
        for part in range(2):
            with open(folder / f"part{part}.jsonl.zst", "wb") as raw, \
                    zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
                for member, text in chosen[part::2]:
                    out.write((json.dumps({"text": text, "id": member}, ensure_ascii=False) + "\n").encode())
        info[name] = {"path": str(folder), "bytes": sum(len(t.encode()) for _, t in chosen), "documents": len(chosen),
                      "archive": str(archive)}
        print(f"  slice {name}: {info[name]['documents']:,} files, {info[name]['bytes'] / 1e6:,.1f} MB", flush=True)
    info_path.write_text(json.dumps(info, indent=2))
    return info


def slice_name(size: float) -> str:
    return "all" if size == FULL else f"{size / 1e6:g}MB"


def shared_tokenizer(work: Path, slices: dict[str, dict[str, Any]]) -> Path:
    """A byte-level BPE (vocab 32000, as linux.yaml) trained once on the middle slice's first 50 MB."""

    out = work / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    name = sorted(slices, key=lambda n: slices[n]["bytes"])[min(1, len(slices) - 1)]
    texts = (doc["text"] for part in sorted(Path(slices[name]["path"]).glob("*.jsonl.zst")) for doc in read_docs(part))
    train_tokenizer(texts, TokenizerConfig(vocab_size=32000, train_bytes=50_000_000), out)
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: the two pipelines per slice
# ---------------------------------------------------------------------------------------------

def ember_config(slice_dir: Path, tokenizer: Path, output: Path) -> Path:
    import yaml

    linux = yaml.safe_load(LINUX_CONFIG.read_text())
    config = {
        "output_dir": str(output), "num_shards": 2, "validation_fraction": 0.0,
        "sources": [{"name": "kernel", "paths": [str(slice_dir / "*.jsonl.zst")], "kind": "code"}],
        "clean": {"unicode_form": "NFC", "normalize_whitespace": False},
        "filters": {"min_chars": linux["filters"]["min_chars"], "code": linux["filters"]["code"]},
        "pii": {"enabled": True, "phones": False, "card_numbers": False},
        # datatrove's MinHash maps every number to 0 (its TextNormConfig default): the same here.
        "dedup": {**linux["dedup"], "minhash": {**linux["dedup"]["minhash"], "normalize_numbers": True}},
        "tokenizer": {"path": str(tokenizer)}, "pack": {"seq_len": 1024},
    }
    path = output.parent / "ember.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Run as a script of its own, the work under the main guard. Each stage prints a marker line when it ends.
DATATROVE_SCRIPT = r'''
import sys
import unicodedata

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline import dedup
from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                  ExactFindDedups)
from datatrove.pipeline.filters import LambdaFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from data_prep.config import CodeFilterConfig
from data_prep.filters import check_code

MIN_CHARS = int(sys.argv[6])
CODE_RULES = CodeFilterConfig(**eval(sys.argv[7]))
BATCH = int(sys.argv[8])


class NFC(BaseFormatter):
    name = "NFC"

    def format(self, text):
        return unicodedata.normalize("NFC", text)


def keep(doc):
    return len(doc.text) >= MIN_CHARS and doc.text.strip() and not check_code(doc.text, CODE_RULES)


def exact_content(doc) -> bytes:
    return " ".join(doc.text.lower().split()).encode("utf-8", "surrogatepass")


def main(corpus, tokenizer, out, tasks, workers):
    exact = ExactDedupConfig(content_getter=exact_content, hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    minhash = dedup.minhash.MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="sha1"), n_grams=5,
                                          num_buckets=14, hashes_per_bucket=8)

    def stage(name, pipeline, n=tasks):
        # fork: the workers are children of this process, so its CPU accounting includes them
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(workers, n), logging_dir=f"{out}/logs/{name}",
                              start_method="fork").run()
        print(f"[stage] {name}", flush=True)

    stage("filter", [JsonlReader(corpus, glob_pattern="*.jsonl.zst", text_key="text", id_key="id"), NFC(),
                     PIIFormatter(remove_emails=True, remove_ips=True, only_remove_public_ips=True),
                     LambdaFilter(keep), JsonlWriter(f"{out}/filtered")])
    stage("exact_signatures", [JsonlReader(f"{out}/filtered"), ExactDedupSignature(f"{out}/exact_sigs", exact)])
    stage("exact_find", [ExactFindDedups(f"{out}/exact_sigs", f"{out}/exact_dups", exact)], n=1)
    stage("exact_filter", [JsonlReader(f"{out}/filtered"),
                           ExactDedupFilter(f"{out}/exact_dups", exact,
                                            exclusion_writer=JsonlWriter(f"{out}/removed_exact")),
                           JsonlWriter(f"{out}/exact_kept")])
    stage("minhash_signatures", [JsonlReader(f"{out}/exact_kept"),
                                 dedup.MinhashDedupSignature(f"{out}/signatures", config=minhash)])
    stage("minhash_buckets", [dedup.MinhashDedupBuckets(f"{out}/signatures", f"{out}/buckets", config=minhash)],
          n=minhash.num_buckets)
    stage("minhash_cluster", [dedup.MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=minhash)], n=1)
    stage("tokenize", [JsonlReader(f"{out}/exact_kept"),
                       dedup.MinhashDedupFilter(f"{out}/remove_ids",
                                                exclusion_writer=JsonlWriter(f"{out}/removed_near")),
                       DocumentTokenizer(f"{out}/tokens", tokenizer_name_or_path=f"{tokenizer}/tokenizer.json",
                                         eos_token="<|endoftext|>", shuffle_documents=False, batch_size=BATCH)])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
'''

EMBER_MARKERS = {step: f"[data_prep] {step} " for step in ("filter", "dedup", "split", "tokenizer", "pack")}
DATATROVE_MARKERS = {stage: f"[stage] {stage}" for stage in (
    "filter", "exact_signatures", "exact_find", "exact_filter", "minhash_signatures", "minhash_buckets",
    "minhash_cluster", "tokenize")}


def ember_removed(out: Path, slice_dir: Path) -> dict[str, set[str]]:
    """Ids of the documents Ember's dedup plan removed, as datatrove names them (the slice's `id` field: Ember
    names a JSON-lines record by its file and line)."""

    removed: dict[str, set[str]] = {"exact_duplicate": set(), "near_duplicate": set()}
    for shard in sorted((out / "filtered").glob("*.jsonl.zst")):
        removals = load_removals(out / "dedup" / (shard.name.removesuffix(".jsonl.zst") + ".removals"))
        for position, doc in enumerate(read_docs(shard)):
            if position in removals:
                removed[removals[position].reason].add(doc["id"])
    lines = {}  # "file:line" -> id, for the removed records only
    wanted = set().union(*removed.values())
    for part in sorted(slice_dir.glob("*.jsonl.zst")):
        for number, record in enumerate(read_docs(part), start=1):
            if f"{part}:{number}" in wanted:
                lines[f"{part}:{number}"] = record["id"]
    return {reason: {lines[where] for where in ids} for reason, ids in removed.items()}


def datatrove_removed(out: Path) -> dict[str, set[str]]:
    """Ids of the documents datatrove's two dedup filters excluded (their exclusion writers' gzip JSON lines)."""
    import gzip

    removed = {}
    for reason, folder in (("exact_duplicate", "removed_exact"), ("near_duplicate", "removed_near")):
        ids: set[str] = set()
        for path in sorted((out / folder).glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                ids |= {json.loads(line)["id"] for line in lines if line.strip()}
        removed[reason] = ids
    return removed


def engines(args: argparse.Namespace, work: Path, slices: dict[str, dict[str, Any]], tokenizer: Path) -> dict:
    script = work / "datatrove_pipeline.py"
    script.write_text(DATATROVE_SCRIPT)
    code_rules = __import__("yaml").safe_load(LINUX_CONFIG.read_text())["filters"]
    results = {}
    for name, info in sorted(slices.items(), key=lambda kv: kv[1]["bytes"]):
        rounds = args.rounds if info["bytes"] < 500e6 else args.full_rounds
        print(f"{name} ({info['bytes'] / 1e6:,.0f} MB, {info['documents']:,} files), {rounds} round(s):", flush=True)
        runs = []
        for index in range(rounds):
            record = {}
            for engine in (("ember", "datatrove") if index % 2 == 0 else ("datatrove", "ember")):
                out = work / "runs" / f"{name}-{engine}-{index}" / "out"
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir(parents=True)
                if engine == "ember":
                    config = ember_config(Path(info["path"]), tokenizer, out)
                    command = [sys.executable, "-m", "data_prep", "run", "--config", str(config),
                               f"--workers={args.workers}"]
                    markers = EMBER_MARKERS
                else:
                    command = [sys.executable, str(script), info["path"], str(tokenizer), str(out), "2",
                               str(args.workers), str(code_rules["min_chars"]), repr(code_rules["code"]),
                               str(args.datatrove_batch_size)]
                    markers = DATATROVE_MARKERS
                result = run_monitored(command, out.parent / "log.txt", kill_after=args.run_timeout,
                                       check=engine == "ember")
                record[engine] = {**public(result), "steps": step_curve(result, markers)}
                if result["exit_code"] != 0:  # datatrove: killed by the watchdog or failed; kept as a result
                    record[engine]["failed"] = f"exit code {result['exit_code']} after {result['seconds']:.0f} s"
                    record["_datatrove_removed"] = set()
                    print(f"  {engine:<9} failed: {record[engine]['failed']}; see {out.parent / 'log.txt'}", flush=True)
                    continue
                if engine == "ember":
                    summary = json.loads((out / "report.json").read_text())
                    record[engine]["documents_out"] = summary["tokens_train"]["num_documents"]
                    record[engine]["tokens"] = summary["tokens_train"]["num_tokens"]
                    removed = ember_removed(out, Path(info["path"]))
                else:
                    ds = sorted((out / "tokens").glob("*.ds"))
                    record[engine]["tokens"] = sum(p.stat().st_size for p in ds) // 2
                    record[engine]["documents_out"] = sum(
                        p.stat().st_size // 8 for p in (out / "tokens").glob("*.ds.index"))
                    removed = datatrove_removed(out)
                record[engine]["removed"] = {k: len(v) for k, v in removed.items()}
                record[f"_{engine}_removed"] = set().union(*removed.values())
                if not args.keep_runs:
                    shutil.rmtree(out.parent)
                print(f"  {engine:<9} {result['seconds']:7.1f} s  CPU {result['cpu_s']:7.1f} s  tree peak RSS "
                      f"{result['tree_rss_mb']:6.0f} MB (PSS {result['tree_pss_mb']:5.0f} MB)  docs out "
                      f"{record[engine]['documents_out']:,}  tokens "
                      f"{record[engine]['tokens']:,}  removed {record[engine]['removed']}", flush=True)
            e, d = record.pop("_ember_removed"), record.pop("_datatrove_removed")
            if "failed" in record["datatrove"]:
                runs.append(record)
                continue
            record["dedup_agreement"] = {"ember": len(e), "datatrove": len(d), "both": len(e & d),
                                         "only_ember": len(e - d), "only_datatrove": len(d - e)}
            record["datatrove_over_ember"] = record["datatrove"]["seconds"] / record["ember"]["seconds"]
            record["datatrove_over_ember_cpu"] = record["datatrove"]["cpu_s"] / record["ember"]["cpu_s"]
            print(f"  datatrove/ember: wall {record['datatrove_over_ember']:.2f}, CPU "
                  f"{record['datatrove_over_ember_cpu']:.2f}; dedup {record['dedup_agreement']}", flush=True)
            runs.append(record)
        if any("failed" in r["datatrove"] for r in runs):
            results[name] = {**info, "rounds": runs}
            continue
        median = {engine: {key: statistics.median(r[engine][key] for r in runs)
                           for key in ("seconds", "cpu_s", "tree_rss_mb", "largest_process_rss_mb", "tree_pss_mb")}
                  for engine in ("ember", "datatrove")}
        results[name] = {**info, "rounds": runs, "median": median,
                         "mb_per_s": {k: info["bytes"] / 1e6 / v["seconds"] for k, v in median.items()},
                         "datatrove_over_ember": median["datatrove"]["seconds"] / median["ember"]["seconds"],
                         "datatrove_over_ember_cpu": median["datatrove"]["cpu_s"] / median["ember"]["cpu_s"]}
    return results


# ---------------------------------------------------------------------------------------------
# Part 2: tokenize + pack against the tokenizer library, per core and with 2 workers
# ---------------------------------------------------------------------------------------------

TOKENIZE_ONE = r'''
import json, sys, time
from pathlib import Path
from data_prep.config import PackConfig
from data_prep.io import read_docs
from data_prep.packing import pack_documents
from data_prep.tokenizer import SavedTokenizer

docs = [d for p in sorted(Path(sys.argv[1]).glob("*.jsonl.zst")) for d in read_docs(p)]
texts = [d["text"] for d in docs]
saved = SavedTokenizer(sys.argv[2])
backend = saved.backend_tokenizer
backend.encode_special_tokens = True
out = {"bytes": sum(len(t.encode("utf-8")) for t in texts), "documents": len(texts), "encoder": saved.encoder,
       "rounds": []}
for index in range(int(sys.argv[4])):
    order = ("raw", "ember") if index % 2 == 0 else ("ember", "raw")
    row = {}
    for what in order:
        start = time.perf_counter()
        if what == "raw":
            tokens = 0
            for i in range(0, len(texts), 1000):
                batch = backend.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False)
                tokens += sum(len(e.ids) for e in batch)
            row["raw_tokens"] = tokens
        else:
            meta = pack_documents(docs, saved, Path(sys.argv[3]) / f"shard{index}", PackConfig(seq_len=1024))
            row["ember_tokens"] = meta["num_tokens"] - meta["num_documents"]  # EOS not counted
        row[f"{what}_s"] = time.perf_counter() - start
    out["rounds"].append(row)
print(json.dumps(out))
'''


def tokenize(args: argparse.Namespace, work: Path, slices: dict[str, dict[str, Any]], tokenizer: Path) -> dict:
    name = sorted(slices, key=lambda n: slices[n]["bytes"])[min(1, len(slices) - 1)]
    folder = work / "runs" / f"tokenize-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # The documents after filtering and dedup, as the pack step reads them.
    config = ember_config(Path(slices[name]["path"]), tokenizer, folder / "out")
    for step in ("filter", "dedup", "split", "tokenizer"):
        subprocess.run([sys.executable, "-m", "data_prep", step, "--config", str(config), "--workers=2"],
                       cwd=REPO_ROOT, env=ENV, check=True, capture_output=True)
    documents = folder / "out" / "documents" / "train"
    result = subprocess.run([sys.executable, "-c", TOKENIZE_ONE, str(documents), str(tokenizer), str(folder),
                             str(args.rounds)], cwd=REPO_ROOT, env=ENV, check=True, capture_output=True, text=True)
    one = json.loads(result.stdout.strip().splitlines()[-1])
    raw = statistics.median(r["raw_s"] for r in one["rounds"])
    ember = statistics.median(r["ember_s"] for r in one["rounds"])
    assert all(r["raw_tokens"] == r["ember_tokens"] for r in one["rounds"]), "token counts differ"
    workers = {}
    for count in (1, 2) * args.rounds:
        shutil.rmtree(folder / "out" / "tokens", ignore_errors=True)
        run = run_monitored([sys.executable, "-m", "data_prep", "pack", "--config", str(config),
                             f"--workers={count}"], folder / f"pack-{count}.log")
        workers.setdefault(count, []).append(run["seconds"])
    one_worker, two_workers = statistics.median(workers[1]), statistics.median(workers[2])
    record = {"slice": name, **{k: v for k, v in one.items() if k != "rounds"}, "rounds": one["rounds"],
              "raw_mb_per_s": one["bytes"] / 1e6 / raw, "ember_mb_per_s": one["bytes"] / 1e6 / ember,
              "ember_over_raw": raw / ember, "pack_step_s": workers,
              "two_workers_over_one": one_worker / two_workers}
    print(f"  tokenize+pack {record['ember_mb_per_s']:.1f} MB/s ({one['encoder']}) against encode_batch_fast "
          f"{record['raw_mb_per_s']:.1f} MB/s: {record['ember_over_raw']:.2f}x; pack step 1 worker {one_worker:.1f} s, "
          f"2 workers {two_workers:.1f} s: {record['two_workers_over_one']:.2f}x", flush=True)
    if not args.keep_runs:
        shutil.rmtree(folder)
    return record


# ---------------------------------------------------------------------------------------------
# Part 3: linux.yaml as a user runs it, and a kill -9 resume at that size
# ---------------------------------------------------------------------------------------------

def data_files(root: Path) -> list[str]:
    """Every output file but the reports (they hold timings), the config copy and executor logs."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "report" not in p.name
                  and p.name != "pipeline_config.yaml" and not p.name.startswith("."))


def user(args: argparse.Namespace, work: Path) -> dict:
    runs = work / "runs"
    command = [sys.executable, "-m", "data_prep", "run", "--config", str(LINUX_CONFIG), f"--workers={args.workers}"]
    if args.archive != kernel_archive_or_none():  # another archive in the kernel's place (the tests' small one)
        command.append(f"--sources.0.paths=[{args.archive}]")
    whole, killed = runs / "user-whole", runs / "user-killed"
    for folder in (whole, killed):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    result = run_monitored([*command, f"--output_dir={whole / 'out'}"], whole / "log.txt")
    summary = json.loads((whole / "out" / "report.json").read_text())
    record = {**public(result), "steps": step_curve(result, EMBER_MARKERS), "report_seconds": summary["seconds"],
              "records": summary["records"]["total"], "tokens_train": summary["tokens_train"],
              "tokens_validation": summary.get("tokens_validation"), "tokenizer": summary.get("tokenizer_report"),
              "dedup_plan": summary.get("plan")}
    print(f"  linux.yaml: {result['seconds']:.0f} s, CPU {result['cpu_s']:.0f} s, tree peak RSS "
          f"{result['tree_rss_mb']:.0f} MB (PSS {result['tree_pss_mb']:.0f} MB), "
          f"{summary['tokens_train']['num_tokens']:,} train tokens", flush=True)
    kill_at = args.kill_fraction * result["seconds"]
    first = run_monitored([*command, f"--output_dir={killed / 'out'}"], killed / "log-killed.txt", kill_after=kill_at,
                          check=False)
    finished_steps = [line for _, line in first["_lines"] if line.startswith("[data_prep]")]
    second = run_monitored([*command, f"--output_dir={killed / 'out'}"], killed / "log-resumed.txt")
    a, b = data_files(whole / "out"), data_files(killed / "out")
    identical = a == b and all(filecmp.cmp(whole / "out" / f, killed / "out" / f, shallow=False) for f in a)
    record["kill_resume"] = {"killed_after_s": kill_at, "exit_code": first["exit_code"],
                             "progress_before_kill": finished_steps[-3:], "resumed_s": second["seconds"],
                             "files_compared": len(a), "byte_identical": identical}
    print(f"  killed at {kill_at:.0f} s (after {finished_steps[-1:] or 'nothing'}), resumed in "
          f"{second['seconds']:.0f} s: {len(a)} files byte-identical: {identical}", flush=True)
    if not args.keep_runs:
        shutil.rmtree(killed)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["engines", "tokenize", "user"],
                        default=["engines", "tokenize", "user"])
    parser.add_argument("--sizes", nargs="+", type=float, default=[10e6, 100e6, FULL],
                        help="slice sizes in bytes; 0 = every code file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per slice under 500 MB")
    parser.add_argument("--full_rounds", type=int, default=1, help="rounds per slice of 500 MB or more")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--archive", type=Path, default=None,
                        help="a tar archive in the kernel's place (default: /usr/src/linux-source-*.tar.xz)")
    parser.add_argument("--kill_fraction", type=float, default=0.6)
    parser.add_argument("--run_timeout", type=float, default=3600,
                        help="seconds before a run's whole process group is killed")
    # datatrove's default, 10,000 documents a batch, held 12 GB per worker on the whole kernel: the kernel killed one
    # of the two and the executor's pool waited forever.
    parser.add_argument("--datatrove_batch_size", type=int, default=1000, help="DocumentTokenizer's batch_size")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "outputs" / "bench_data_scaling")
    parser.add_argument("--keep_runs", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "data_scaling_cpu.json")
    args = parser.parse_args(argv)
    args.archive = args.archive or kernel_archive()
    machine = {"cpu_model": cpu_model_name(), "cores_available": available_cores(), "platform": platform.platform(),
               "python": platform.python_version(), "memory_gb": psutil.virtual_memory().total / 1e9}
    load_before = os.getloadavg()
    print(f"machine: {machine['cpu_model']} | {machine['cores_available']} cores | load {load_before[0]:.2f}",
          flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {}
    if {"engines", "tokenize"} & set(args.parts):
        slices = make_slices(args.work, args.sizes, args.archive)
        slices = {slice_name(s): slices[slice_name(s)] for s in args.sizes}
        tokenizer = shared_tokenizer(args.work, slices)
        if "engines" in args.parts:
            fields["engines"] = engines(args, args.work, slices, tokenizer)
        if "tokenize" in args.parts:
            fields["tokenize"] = tokenize(args, args.work, slices, tokenizer)
    if "user" in args.parts:
        fields["user"] = user(args, args.work)
    save_record("bench_data_scaling", RESULTS, args.output, argv, machine, load_before, os.getloadavg(), **fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
