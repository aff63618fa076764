"""The data pipeline: five steps over N shards, each resumable, each accounted for in a report.

    filter     per shard   read the mixed sources, clean, quality-filter, redact PII, drop toxic
                           and eval-contaminated documents; compute dedup signatures
    dedup      global      exact and MinHash near-duplicate clusters across all shards
    split      per shard   drop duplicates, route each document to train or validation
    tokenizer  global      train a tokenizer on train documents (or load `tokenizer.path`), report
                           compression on validation documents
    pack       per shard   tokenize, append EOS, pack into `seq_len + 1` blocks (pre-tokenized shards)

Layout under `output_dir`:

    filtered/<shard>.jsonl.zst      documents after filtering (+ .report.json, .sig dedup signatures)
    dedup/<shard>.removals          what the dedup plan removes from each shard (+ plan.json)
    documents/{train,validation}/<shard>.jsonl.zst   (+ <shard>.report.json)
    tokenizer/                      a `PreTrainedTokenizerFast` directory (+ tokenizer_report.json)
    tokens/{train,validation}/<shard>.{bin,idx.npy,json}
    report.json, report.txt         every step, merged over shards

A shard step is done when its final output file exists; outputs are written to a temporary name and
renamed, so an interrupted run redoes at most the shards that were in flight and never reads a
half-written file. Steps are deterministic: the same config gives byte-identical outputs whether a
run was interrupted or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from data_prep.clean import clean_text
from data_prep.config import ConfigError, PackConfig, PipelineConfig, load_config
from data_prep.io import atomic_write_text, read_docs, shard_name, write_docs
from data_prep.packing import pack_documents
from data_prep.report import (
    PipelineError,
    StepReport,
    accounting,
    format_table,
    load_reports,
    merge_reports,
    save_reports,
)
from data_prep.sensitive import PIIRedactor, ToxicityFilter
from data_prep.tokenizer import SavedTokenizer, compression_stats, copy_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from data_prep.dedup import Removal

STEPS = ("filter", "dedup", "split", "tokenizer", "pack")
RUN_CONFIG_FILE = "pipeline_config.yaml"  # the run's settings, written at its start
SPLITS = ("train", "validation")
HELDOUT_SAMPLE_BYTES = 20_000_000  # validation text the tokenizer's compression is measured on


def _shards(cfg: PipelineConfig) -> list[str]:
    return [shard_name(i, cfg.num_shards, "") for i in range(cfg.num_shards)]


def _report_path(doc_path: Path) -> Path:
    return doc_path.with_name(doc_path.name.removesuffix(".jsonl.zst") + ".report.json")


def _unit_hash(doc_id: str, salt: str = "") -> float:
    """A number in [0, 1) from the document id (and `salt`, which makes draws for other purposes independent)."""
    key = (doc_id + salt).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64


def is_validation(doc_id: str, fraction: float) -> bool:
    """Held-out assignment from the document id: the same on every rerun (and, for files, any sharding)."""
    return fraction > 0 and _unit_hash(doc_id) < fraction


# ---------------------------------------------------------------------------------------------
# Per-shard steps
# ---------------------------------------------------------------------------------------------

def filter_shard(cfg: PipelineConfig, index: int) -> Path:
    """Read this shard of the sources and keep the documents every filter accepts."""
    # Lazy: they load datasets and datatrove (~0.7 s; datatrove is the optional `data` extra), which importing this
    # module (training reads packing_settings from it) and the other steps do without.
    from data_prep.decontam import Decontaminator
    from data_prep.dedup import DedupSignatures
    from data_prep.filters import QualityFilters
    from data_prep.sources import account, mixed_records

    name = _shards(cfg)[index]
    out = cfg.step_dir("filtered") / f"{name}.jsonl.zst"
    if out.exists():
        return out
    quality, pii = QualityFilters(cfg.filters), PIIRedactor(cfg.pii)
    toxicity, decontam = ToxicityFilter(cfg.toxicity), Decontaminator(cfg.decontam)
    read_report = StepReport("read", strict=cfg.strict)
    pii_report = StepReport("pii")

    def redact(text: str, kind: str) -> tuple[str, str]:
        redacted, counts = pii.redact(text)
        pii_report.extra.update(counts)
        return redacted, ""

    # Each stage maps (text, kind) to (new text, "") or (None/any, removal reason).
    stages = [(StepReport("clean"), lambda text, kind: (clean_text(text, kind, cfg.clean), "")),
              (StepReport("filter"), quality.apply)]
    if pii.enabled:
        stages.append((pii_report, redact))
    if toxicity.enabled:
        stages.append((StepReport("toxicity"), lambda text, kind: (text, toxicity.check(text) or "")))
    if decontam.enabled:
        stages.append((StepReport("decontam"), lambda text, kind: (text, decontam.check(text) or "")))
    signatures = DedupSignatures(cfg.dedup)
    records = mixed_records(cfg.sources, cfg.mixture, index, cfg.num_shards, cfg.max_doc_bytes)

    def kept_documents() -> Iterator[dict[str, Any]]:
        position = 0
        for doc in tqdm(account(records, read_report, cfg.sources), desc=f"filter {name}", unit="doc",
                        mininterval=2, disable=None):
            text: str | None = doc["text"]
            for report, stage in stages:
                text = _through(report, stage, text, doc["kind"], doc["id"], doc["source"])
                if text is None:
                    break
            if text is None:
                continue
            signatures.add(position, text)
            position += 1
            yield {"id": doc["id"], "source": doc["source"], "kind": doc["kind"], "stage": doc["stage"], "text": text}

    # Documents first into a temporary file, then signatures and the report, then the rename that
    # marks the shard done: a kill at any point leaves no file a later step would trust.
    tmp = out.with_name(f".{out.name}.partial")
    write_docs(tmp, kept_documents())
    signatures.save(out.with_suffix("").with_suffix(".sig"))
    save_reports([read_report] + [report for report, _ in stages], _report_path(out))
    tmp.replace(out)
    return out


def _through(report: StepReport, stage, text: str, kind: str, where: str, source: str) -> str | None:
    """Run one filter stage on a document, accounting for it; None when the document is removed."""
    report.seen(text, source)
    new_text, reason = stage(text, kind)
    if new_text is None or reason:
        report.remove(reason or "removed", where, source=source)
        return None
    if not new_text.strip():
        report.remove(f"empty_after_{report.step}", where, source=source)
        return None
    report.kept(new_text, source)
    return new_text


def split_shard(cfg: PipelineConfig, index: int) -> dict[str, Path]:
    """Drop this shard's duplicates and route each document to train or validation."""
    from data_prep.dedup import load_removals  # lazy: dedup needs datatrove, the optional `data` extra

    name = _shards(cfg)[index]
    outs = {split: cfg.step_dir("documents") / split / f"{name}.jsonl.zst" for split in SPLITS}
    if all(p.exists() for p in outs.values()):
        return outs
    source = cfg.step_dir("filtered") / f"{name}.jsonl.zst"
    removals_path = cfg.step_dir("dedup") / f"{name}.removals"
    if not source.exists() or not removals_path.exists():
        raise PipelineError(f"split {name}: needs {source.name} and the dedup plan; run the filter and dedup steps")
    removals = load_removals(removals_path)
    dedup, split_report = StepReport("dedup", strict=cfg.strict), StepReport("split")
    # One sequential pass over the compressed shard per output keeps memory flat; the first pass
    # does the accounting.
    for split, reports in (("train", (dedup, split_report)), ("validation", None)):
        tmp = outs[split].with_name(f".{outs[split].name}.partial")
        write_docs(tmp, _routed(source, removals, cfg.validation_fraction, split, reports))
        if reports:
            save_reports(list(reports), _report_path(outs["train"]))
        tmp.replace(outs[split])
    return outs


def _routed(source: Path, removals: dict[int, Removal], fraction: float, split: str,
            reports: tuple[StepReport, StepReport] | None) -> Iterator[dict[str, Any]]:
    docs = read_docs(source)
    if reports:
        name = source.name.removesuffix(".jsonl.zst")
        docs = tqdm(docs, desc=f"split {name}", unit="doc", mininterval=2, disable=None)
    for position, doc in enumerate(docs):
        target = "validation" if is_validation(doc["id"], fraction) else "train"
        if reports:
            dedup, split_report = reports
            dedup.seen(doc["text"], doc["source"])
            if position in removals:
                dedup.remove(removals[position].reason, doc["id"], source=doc["source"])
            else:
                dedup.kept(doc["text"], doc["source"])
                split_report.seen(doc["text"], doc["source"])
                split_report.kept(doc["text"], doc["source"])
                split_report.extra[f"docs/{target}"] += 1
        if position not in removals and target == split:
            yield doc


def pack_shard(cfg: PipelineConfig, index: int) -> dict[str, Path]:
    """Tokenize and pack this shard's train and validation documents."""
    name = _shards(cfg)[index]
    outs = {split: cfg.step_dir("tokens") / split / name for split in SPLITS}
    if all(p.with_suffix(".json").exists() for p in outs.values()):
        return outs
    tokenizer_dir = cfg.step_dir("tokenizer")
    if not (tokenizer_dir / "tokenizer.json").exists():
        raise PipelineError(f"pack {name}: no tokenizer in {tokenizer_dir}; run the tokenizer step")
    tokenizer = SavedTokenizer(tokenizer_dir)
    for split in SPLITS:
        if outs[split].with_suffix(".json").exists():
            continue
        source = cfg.step_dir("documents") / split / f"{name}.jsonl.zst"
        if not source.exists():
            raise PipelineError(f"pack {name}: {source} is missing; run the split step")
        report = StepReport(f"pack/{split}")
        # FIM draws are seeded by document position; give every shard and split its own stream.
        pack_cfg = dataclasses.replace(cfg.pack, seed=cfg.pack.seed * 1_000_003 + 2 * index + (split == "validation"))
        pack_documents(_counted(read_docs(source), report), tokenizer, outs[split], pack_cfg, report)
        report.extra[f"encoded_with/{tokenizer.encoder}"] += 1
        save_reports([report], outs[split].with_suffix(".report.json"))
    return outs


def _counted(docs: Iterator[dict[str, Any]], report: StepReport) -> Iterator[dict[str, Any]]:
    for doc in docs:
        report.seen(doc["text"])
        report.kept(doc["text"])
        yield doc


# ---------------------------------------------------------------------------------------------
# Global steps
# ---------------------------------------------------------------------------------------------

def dedup_plan(cfg: PipelineConfig) -> Path:
    """Find duplicate clusters across all shards and write one removal list per shard."""
    from data_prep.dedup import plan_removals  # lazy: dedup needs datatrove, the optional `data` extra

    plan = cfg.step_dir("dedup") / "plan.json"
    if plan.exists():
        return plan
    names = _shards(cfg)
    signatures = [cfg.step_dir("filtered") / f"{n}.sig" for n in names]
    done = [cfg.step_dir("filtered") / f"{n}.jsonl.zst" for n in names]
    missing = [n for n, p in zip(names, done) if not p.exists()]
    if missing:
        raise PipelineError(f"dedup: filter shards not finished yet: {', '.join(missing)}")
    removals = [cfg.step_dir("dedup") / f"{n}.removals" for n in names]
    counts = plan_removals(signatures, cfg.dedup, removals)
    atomic_write_text(plan, json.dumps(dict(counts), indent=2))
    return plan


def train_or_load_tokenizer(cfg: PipelineConfig) -> Path:
    """Train the tokenizer on at most `tokenizer.train_bytes` of train documents, drawn evenly from the whole
    corpus (`tokenizer_sample_share`), or copy `tokenizer.path`."""
    out = cfg.step_dir("tokenizer")
    report_path = cfg.root / "tokenizer_report.json"
    if report_path.exists():
        return out
    names = _shards(cfg)
    train_files = [cfg.step_dir("documents") / "train" / f"{n}.jsonl.zst" for n in names]
    missing = [n for n, p in zip(names, train_files) if not p.exists()]
    if missing:
        raise PipelineError(f"tokenizer: split shards not finished yet: {', '.join(missing)}")
    if cfg.tokenizer.path:
        tokenizer = copy_tokenizer(cfg.tokenizer.path, out)
        trained_on = None
    else:
        used: dict[str, int] = {}  # train_tokenizer stops at tokenizer.train_bytes itself
        share = tokenizer_sample_share(cfg)
        try:
            tokenizer = train_tokenizer(_round_robin(train_files, share), cfg.tokenizer, out, used=used)
        except ConfigError:
            raise
        except ValueError:
            if used.get("bytes"):
                raise
            raise PipelineError(f"tokenizer: no train documents are left after filtering and dedup; the removals "
                                f"are counted in {cfg.step_dir('filtered')}/*.report.json") from None
        trained_on = used["bytes"]
    validation = [cfg.step_dir("documents") / "validation" / f"{n}.jsonl.zst" for n in names]
    stats = compression_stats(tokenizer, _first_bytes(_round_robin(validation), HELDOUT_SAMPLE_BYTES))
    stats.update(trained_on_bytes=trained_on, vocab_size=len(tokenizer), source=cfg.tokenizer.path or "trained")
    if trained_on is not None:
        stats.update(trained_on_docs=used["docs"], sampled_share=share)
    atomic_write_text(report_path, json.dumps(stats, indent=2))
    return out


def tokenizer_sample_share(cfg: PipelineConfig) -> float:
    """The share of train documents the tokenizer's sample draws: all of them when the corpus fits in
    `tokenizer.train_bytes`, else enough to fill it (with a 10 % margin) from every part of the corpus."""
    train_bytes = 0
    for name in _shards(cfg):
        split = next(r for r in load_reports(_report_path(cfg.step_dir("documents") / "train" / f"{name}.jsonl.zst"))
                     if r.step == "split")
        train_bytes += split.bytes_out
    train_bytes = int(train_bytes * (1 - cfg.validation_fraction))
    return min(1.0, 1.1 * cfg.tokenizer.train_bytes / train_bytes) if train_bytes else 1.0


def _first_bytes(texts: Iterator[str], limit: int) -> Iterator[str]:
    """Whole texts until at least `limit` UTF-8 bytes have gone by."""
    seen = 0
    for text in texts:
        if seen >= limit:
            return
        seen += len(text.encode("utf-8", "surrogatepass"))
        yield text


def _round_robin(paths: list[Path], share: float = 1.0) -> Iterator[str]:
    """Texts from all shards in turn, so a byte budget samples every shard, not just the first. With `share` < 1,
    a document is kept when a hash of its id falls under it: an even, deterministic sample of the whole corpus
    rather than its first files (a source tree read in path order would give a tokenizer of its first folders)."""
    readers = [read_docs(p) for p in paths if p.exists()]
    while readers:
        for reader in list(readers):
            doc = next(reader, None)
            if doc is None:
                readers.remove(reader)
            elif share >= 1.0 or _unit_hash(doc["id"], "tokenizer") < share:
                yield doc["text"]


# ---------------------------------------------------------------------------------------------
# Running steps and collecting the report
# ---------------------------------------------------------------------------------------------

_SHARD_FUNCTIONS = {"filter": filter_shard, "split": split_shard, "pack": pack_shard}
_GLOBAL_FUNCTIONS = {"dedup": dedup_plan, "tokenizer": train_or_load_tokenizer}


def run_step(cfg: PipelineConfig, step: str, shard_indices: list[int] | None = None, workers: int = 1) -> None:
    start = time.perf_counter()
    if step in _GLOBAL_FUNCTIONS:
        _GLOBAL_FUNCTIONS[step](cfg)
        _progress(f"{step} done", start)
        return
    indices = list(range(cfg.num_shards)) if shard_indices is None else shard_indices
    function = _SHARD_FUNCTIONS[step]
    if workers <= 1 or len(indices) <= 1:
        results = (function(cfg, index) for index in indices)
    else:
        # Ctrl-C reaches every process of the terminal's group: only this one stops on it; the workers finish the
        # shards they hold (each written whole or not at all) and the rest are cancelled.
        pool = ProcessPoolExecutor(max_workers=workers, initializer=signal.signal,
                                   initargs=(signal.SIGINT, signal.SIG_IGN))
        results = pool.map(function, [cfg] * len(indices), indices)
    try:
        for done, _ in enumerate(results, start=1):
            _progress(f"{step} {done}/{len(indices)} shards", start)
    finally:
        if workers > 1 and len(indices) > 1:
            pool.shutdown(cancel_futures=True)


def _progress(what: str, start: float) -> None:
    """One line per finished unit of work: the progress shown when the output is a file (no bars there)."""
    print(f"[data_prep] {what} ({time.perf_counter() - start:.0f} s)", flush=True)


def run_pipeline(cfg: PipelineConfig, steps: list[str] | None = None, shard_indices: list[int] | None = None,
                 workers: int = 1) -> list[StepReport]:
    """Run `steps` (all by default) in order; returns the merged report when every shard is complete.

    With `shard_indices` (a cluster array job), global steps run only once all shards are ready;
    until then the run stops after the shard steps it could do and says what is missing.
    """
    steps = list(steps or STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise PipelineError(f"unknown step {unknown[0]!r}; steps are {', '.join(STEPS)}")
    cfg.root.mkdir(parents=True, exist_ok=True)
    if shard_indices is None:  # array tasks may be writing beside us otherwise
        remove_stale_temporaries(cfg.root)
    atomic_write_text(cfg.root / RUN_CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.executor != "local" and shard_indices is None:
        # Lazy: datatrove's Ray and Slurm executors take ~0.3 s to import and are the optional `data` extra.
        from data_prep import executors

        ordered = [step for step in STEPS if step in steps]
        if cfg.executor == "slurm":
            jobs = executors.submit_slurm(cfg, ordered, run_task)
            print(f"[data_prep] submitted to Slurm: {', '.join(f'{k} {v}' for k, v in jobs.items())}; "
                  f"`python -m data_prep status` with this config shows progress")
            return []
        timings = executors.run_ray(cfg, ordered, run_task)
        remove_stale_temporaries(cfg.root)  # left by tasks whose worker was killed and retried
        reports = collect_reports(cfg)
        if reports:
            write_summary(cfg, reports, timings)
        return reports
    timings = {}
    for step in STEPS:
        if step not in steps:
            continue
        start = time.perf_counter()
        try:
            run_step(cfg, step, shard_indices, workers)
        except PipelineError:
            if shard_indices is None:
                raise
            print(f"[data_prep] stopping before {step}: other shards are not finished (rerun once they are)")
            return []
        timings[step] = time.perf_counter() - start
    reports = collect_reports(cfg)
    if reports:
        write_summary(cfg, reports, timings)
    return reports


def packing_settings(data_dir: str | Path) -> PackConfig:
    """How a finished run packed its documents (its `pack` section), for packing more the same way on the fly;
    the defaults for a folder that no pipeline run wrote."""
    saved = Path(data_dir) / RUN_CONFIG_FILE
    return load_config(saved).pack if saved.is_file() else PackConfig()


def split_bytes_per_token(data_dir: str | Path, split: str = "validation") -> float | None:
    """UTF-8 bytes per token of a finished run's packed `split` (from its report.json), which turns a loss in nats
    per token into bits per byte; None when the run has no such report."""
    try:
        summary = json.loads((Path(data_dir) / "report.json").read_text(encoding="utf-8"))
        step = next(s for s in summary["steps"] if s["step"] == f"pack/{split}")
        tokens = step["extra"]["tokens"]
        return step["bytes_in"] / tokens if tokens else None
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def remove_stale_temporaries(root: Path) -> int:
    """Delete the hidden temporary files and folders a killed run left behind; returns how many."""
    stale = [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".partial"))]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def collect_reports(cfg: PipelineConfig) -> list[StepReport]:
    """Merge every finished shard's step reports into one list; empty unless every shard is done."""
    names = _shards(cfg)
    groups = []
    for directory in (cfg.step_dir("filtered"), cfg.step_dir("documents") / "train"):
        paths = [directory / f"{n}.report.json" for n in names]
        if not all(p.exists() for p in paths):
            return []
        groups.extend(load_reports(p) for p in paths)
    for split in SPLITS:
        paths = [cfg.step_dir("tokens") / split / f"{n}.report.json" for n in names]
        groups.extend(load_reports(p) for p in paths if p.exists())
    return merge_reports(groups)


def write_final_report(cfg: PipelineConfig) -> None:
    """report.json and report.txt of a run whose steps ran elsewhere (the last Slurm job)."""
    reports = collect_reports(cfg)
    if not reports:
        raise PipelineError(f"{cfg.root}: not every shard is finished; nothing to report")
    remove_stale_temporaries(cfg.root)  # left by tasks that were killed and ran again
    write_summary(cfg, reports, {})


def run_task(cfg: PipelineConfig, step: str, rank: int) -> None:
    """One task of a Ray or Slurm run (`data_prep.executors`): shard `rank` of a per-shard step, the whole of a
    global step, or, for the step "report", the report of the finished run."""
    if step == "report":
        write_final_report(cfg)
    else:
        run_step(cfg, step, None if step in _GLOBAL_FUNCTIONS else [rank])


def write_summary(cfg: PipelineConfig, reports: list[StepReport], timings: dict[str, float]) -> None:
    summary: dict[str, Any] = {"steps": [r.to_dict() for r in reports], "records": accounting(reports),
                               "seconds": timings}
    for name in ("tokenizer_report.json", "dedup/plan.json"):
        path = cfg.root / name
        if path.exists():
            summary[name.split("/")[-1].removesuffix(".json")] = json.loads(path.read_text(encoding="utf-8"))
    for split in SPLITS:
        metas = [json.loads(p.read_text()) for p in sorted((cfg.step_dir("tokens") / split).glob("*[0-9].json"))]
        if metas:
            summary[f"tokens_{split}"] = {key: sum(m[key] for m in metas)
                                          for key in ("num_tokens", "num_documents", "num_blocks", "remainder_tokens")}
    table = format_table(reports)
    atomic_write_text(cfg.root / "report.json", json.dumps(summary, indent=2))
    atomic_write_text(cfg.root / "report.txt", table + "\n")
    print(table)
    for split in SPLITS:
        if f"tokens_{split}" in summary:
            t = summary[f"tokens_{split}"]
            print(f"{split}: {t['num_tokens']:,} tokens in {t['num_blocks']:,} blocks of {cfg.pack.seq_len + 1} "
                  f"({t['num_documents']:,} documents, {t['remainder_tokens']:,} tokens in final partial blocks)")
