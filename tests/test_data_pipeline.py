"""The whole data pipeline on a small local corpus: every removal accounted for, tokens conserved,
sharded and resumable (a SIGKILL mid-run and a rerun give byte-identical outputs), and the CLI."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import yaml

from data_prep.config import ConfigError, load_config
from data_prep.io import read_docs
from data_prep.pipeline import collect_reports, is_validation, run_pipeline
from data_prep.token_dataset import PackedDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
EMAIL = "jane.doe@example.org"


def english_documents() -> list[str]:
    """Real English prose: pairs of paragraphs from the interpreter's pydoc topics."""
    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            words = block.split()
            if len(words) >= 50 and block.count(". ") >= 2 and not block.lstrip().startswith(("*", "|", ">>>")):
                paragraphs.append(" ".join(words))
    paragraphs = list(dict.fromkeys(paragraphs))  # some topics repeat a paragraph word for word
    return ["\n\n".join(paragraphs[i : i + 2]) for i in range(0, len(paragraphs) - 1, 2)]


def make_corpus(root: Path) -> dict:
    """Text jsonl with planted duplicates, PII, bad lines and an eval-contaminated document; code files."""
    root.mkdir(parents=True, exist_ok=True)
    docs = english_documents()[:60]
    assert len(docs) == 60
    rng = random.Random(0)
    near = docs[1].split()
    for i in rng.sample(range(len(near)), 2):
        near[i] = "altered"
    rows = [{"text": d} for d in docs]
    rows[5]["text"] += f" Questions go to {EMAIL} at any time."
    rows += [{"text": docs[0]}, {"text": docs[0]}, {"text": " ".join(near)}]  # 2 exact + 1 near duplicate
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, '{"text": "cut off')   # malformed
    lines.insert(20, '{"title": "no text"}')  # missing field
    (root / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    eval_words = docs[7].split()[10:40]
    (root / "eval.jsonl").write_text(json.dumps({"text": " ".join(eval_words)}) + "\n", encoding="utf-8")
    code = root / "code"
    code.mkdir(exist_ok=True)
    import json as json_module
    for path in sorted(Path(json_module.__file__).parent.glob("*.py")):
        (code / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return {"text_docs": len(rows), "bad_lines": 2}


def write_config(root: Path, output: Path, name: str = "pipeline.yaml", **extra) -> Path:
    config = {
        "output_dir": str(output),
        "num_shards": 3,
        "sources": [{"name": "web", "paths": [str(root / "web.jsonl")]},
                    {"name": "code", "paths": [str(root / "code")], "kind": "code", "stage": 1}],
        "decontam": {"eval_files": [str(root / "eval.jsonl")]},
        "validation_fraction": 0.1,
        "tokenizer": {"vocab_size": 600, "min_frequency": 1},
        "pack": {"seq_len": 64},
        **extra,
    }
    path = output.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def outputs(output: Path) -> dict[str, bytes]:
    """Every data file of a run by relative path; reports and the config copy name the run's own paths."""
    files = {}
    for path in sorted(output.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and "report" not in path.name and \
                path.name != "pipeline_config.yaml":
            files[str(path.relative_to(output))] = path.read_bytes()
    assert any(name.endswith(".bin") for name in files)
    return files


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """One corpus for every run: document ids name their file, and the held-out split follows the ids."""
    root = tmp_path_factory.mktemp("corpus")
    info = make_corpus(root)
    (root / "info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def finished_run(corpus_dir, tmp_path_factory):
    cfg = load_config(write_config(corpus_dir, tmp_path_factory.mktemp("pipeline") / "out", name="reference.yaml"))
    reports = run_pipeline(cfg)
    return cfg, {r.step: r for r in reports}, json.loads((corpus_dir / "info.json").read_text())


def test_every_document_is_accounted_for(finished_run):
    cfg, reports, corpus = finished_run
    read = reports["read"]
    assert read.removed["malformed_json"] == 1 and read.removed["missing_text_field"] == 1
    assert read.extra["docs_from/web"] == corpus["text_docs"]
    for step in ("read", "clean", "filter", "pii", "decontam", "dedup", "split"):
        report = reports[step]
        assert report.docs_in == report.docs_out + sum(report.removed.values()), step
    # Records read = kept + removed by reason, per source and in total, in report.json and report.txt.
    summary = json.loads((cfg.root / "report.json").read_text())
    records = summary["records"]
    assert set(records) == {"web", "code", "total"}
    assert records["web"]["read"] == corpus["text_docs"] + corpus["bad_lines"]
    for name, row in records.items():
        assert row["read"] == row["kept"] + sum(row["removed"].values()) and row["balanced"], name
    assert records["total"]["read"] == read.docs_in and records["total"]["kept"] == reports["split"].docs_out
    assert records["web"]["removed"]["malformed_json"] == 1 and records["web"]["removed"]["exact_duplicate"] == 2
    text = (cfg.root / "report.txt").read_text()
    total = records["total"]
    line = next(line for line in text.splitlines() if line.strip().startswith("total:")).split()
    assert line[1:6] == [f"{total['read']:,}", "=", f"{total['kept']:,}", "+", f"{total['read'] - total['kept']:,}"]
    assert "does not add up" not in text
    # Steps chain: what one step keeps, the next one reads.
    chain = ["read", "clean", "filter", "pii", "decontam", "dedup", "split"]
    for before, after in zip(chain, chain[1:]):
        assert reports[before].docs_out == reports[after].docs_in, (before, after)
    assert reports["decontam"].removed == {"contaminated:eval.jsonl": 1}
    assert reports["dedup"].removed["exact_duplicate"] == 2
    assert reports["dedup"].removed["near_duplicate"] >= 1
    assert reports["pii"].extra["pii/email"] >= 1


def test_documents_are_redacted_split_and_packed(finished_run):
    cfg, reports, _ = finished_run
    from data_prep.io import read_docs

    docs = {split: [d for p in sorted((cfg.root / "documents" / split).glob("*.jsonl.zst")) for d in read_docs(p)]
            for split in ("train", "validation")}
    everything = docs["train"] + docs["validation"]
    assert not any(EMAIL in d["text"] for d in everything)
    assert any("<EMAIL>" in d["text"] for d in everything)
    assert len({d["id"] for d in everything}) == len(everything) == reports["split"].docs_out
    assert docs["validation"] and all(is_validation(d["id"], 0.1) for d in docs["validation"])
    assert not any(is_validation(d["id"], 0.1) for d in docs["train"])
    assert {d["kind"] for d in everything} == {"text", "code"}

    summary = json.loads((cfg.root / "report.json").read_text())
    for split in ("train", "validation"):
        dataset = PackedDataset(cfg.root / "tokens" / split)
        totals = summary[f"tokens_{split}"]
        assert len(dataset) == totals["num_blocks"] > 0
        assert dataset.num_documents == totals["num_documents"] == len(docs[split])
        shards = [json.loads(p.read_text()) for p in sorted((cfg.root / "tokens" / split).glob("*[0-9].json"))]
        assert len(shards) == cfg.num_shards
        for meta in shards:  # consecutive blocks share one token: a shard's first block brings seq_len + 1
            overlap = 1 if meta["num_blocks"] else 0
            assert meta["num_tokens"] == meta["num_blocks"] * cfg.pack.seq_len + overlap + meta["remainder_tokens"]
        assert totals["num_tokens"] == sum(m["num_tokens"] for m in shards)
        item = dataset[len(dataset) - 1]
        assert item["input_ids"].shape == (cfg.pack.seq_len,)
    assert summary["tokenizer_report"]["bytes_per_token"] > 1.5
    assert (cfg.root / "report.txt").read_text().startswith("step")


def test_collect_reports_is_empty_until_every_shard_is_done(finished_run, tmp_path):
    cfg, _, _ = finished_run
    assert collect_reports(cfg)
    partial = load_config(raw={**cfg.to_dict(), "output_dir": str(tmp_path / "none")})
    assert collect_reports(partial) == []


@pytest.mark.parametrize("override,message", [
    ("--tokenizer.vocab_size=10", "tokenizer.vocab_size: must be >= 272 for model bpe, got 10"),
    ("--max_doc_bytes=-1", "max_doc_bytes: must be >= 1, got -1"),
    ("--sources.0.max_docs=0", "sources.0.max_docs: must be >= 1 (leave it out for no limit), got 0"),
    ("--sources.0.max_docs=-5", "sources.0.max_docs: must be >= 1 (leave it out for no limit), got -5"),
    ("--pack.batch_docs=0", "pack.batch_docs: must be >= 1, got 0"),
])
def test_wrong_values_fail_at_load_naming_the_field(corpus_dir, tmp_path, override, message):
    config = write_config(corpus_dir, tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert str(err.value) == message


def test_a_too_small_vocabulary_fails_before_any_work(corpus_dir, tmp_path):
    config = write_config(corpus_dir, tmp_path / "out")
    result = _cli("run", "--config", str(config), "--tokenizer.vocab_size=10")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: tokenizer.vocab_size: must be >= 272 for model bpe, got 10"
    assert not (tmp_path / "out").exists()


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def test_cli_errors_are_one_line(corpus_dir, tmp_path):
    config = write_config(corpus_dir, tmp_path / "out")
    result = _cli("run", "--config", str(config), "--dedup.minhash.treshold=0.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: dedup.minhash.treshold: unknown key (known: enabled, hashes_per_bucket, n_grams, "
        "normalize_numbers, num_buckets, seed)"] or result.stderr.strip().startswith("error: dedup.minhash.treshold")
    assert len(result.stderr.strip().splitlines()) == 1
    result = _cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = _cli("run", "--config", str(config), "--strict")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {corpus_dir / 'web.jsonl'}:11: malformed_json"


def test_an_input_that_filters_to_nothing_stops_with_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "tiny.jsonl").write_text('{"text": "hi"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "out", "num_shards": 2, "sources": [
        {"name": "s", "paths": ["empty.jsonl", "tiny.jsonl"]}], "filters": {"min_chars": 10}}))
    result = _cli("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: tokenizer: no train documents are left after filtering and dedup; "
                                     f"the removals are counted in {tmp_path / 'out' / 'filtered'}/*.report.json")
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "filtered").glob("*.report.json"))]
    removed = [r["removed"] for shard in reports for r in shard if r["removed"]]
    assert {"empty_file": 1} in removed and {"too_short": 1} in removed


def _run_until(config: Path, marker_glob: str, output: Path) -> None:
    """Start the pipeline, SIGKILL it as soon as `marker_glob` matches a file under `output`."""
    process = subprocess.Popen([sys.executable, "-m", "data_prep", "run", "--config", str(config)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not list(output.glob(marker_glob)):
        time.sleep(0.02)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("marker", ["filtered/00000-of-00003.jsonl.zst", "tokens/train/00000-of-00003.json"])
def test_killed_run_resumes_to_identical_outputs(finished_run, corpus_dir, tmp_path, marker):
    cfg, _, _ = finished_run
    config = write_config(corpus_dir, tmp_path / "out")
    _run_until(config, marker, tmp_path / "out")
    assert (tmp_path / "out" / marker).exists()
    assert not (tmp_path / "out" / "report.json").exists()  # really interrupted
    result = _cli("run", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert outputs(tmp_path / "out") == outputs(cfg.root)
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary left behind


def test_shard_by_shard_runs_equal_one_run(finished_run, corpus_dir, tmp_path, capsys):
    """What a cluster does: per-shard steps as array jobs (any order), each global step once after them."""
    from data_prep.__main__ import main

    cfg, _, _ = finished_run
    config = write_config(corpus_dir, tmp_path / "out")
    assert main(["run", "--config", str(config), "--shard-index", "2"]) == 0  # the old spelling still works
    captured = capsys.readouterr()
    assert "other shards are not finished" in captured.out
    assert "warning: --shard-index is deprecated, write --shard_index" in captured.err
    for step in ("filter", "dedup", "split", "tokenizer", "pack"):
        for index in ([None] if step in ("dedup", "tokenizer") else [1, 0, 2]):
            shard = [] if index is None else [f"--shard_index={index}"]
            assert main([step, "--config", str(config), *shard]) == 0, (step, index, capsys.readouterr().err)
    assert outputs(tmp_path / "out") == outputs(cfg.root)


def test_token_shards_match_the_tokenizer(finished_run):
    cfg, _, _ = finished_run
    from data_prep.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(cfg.root / "tokenizer")
    dataset = PackedDataset(cfg.root / "tokens" / "train", expected_fingerprint=tokenizer_fingerprint(tokenizer))
    ids = np.concatenate([dataset[i]["input_ids"].numpy() for i in range(len(dataset))])
    assert ids.max() < len(tokenizer)
    text = tokenizer.decode(ids[:200].tolist())
    assert text.strip()


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "recipes" / "configs" / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_with_paths_beside_them(config):
    cfg = load_config(config)
    assert Path(cfg.output_dir).is_absolute()
    assert Path(cfg.output_dir).resolve().is_relative_to(REPO_ROOT / "outputs")
    assert config.read_text().startswith("# Hardware:")


def test_default_stdlib_config_runs_offline_at_small_size(tmp_path):
    config = REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"
    result = _cli("run", "--config", str(config), f"--output_dir={tmp_path / 'out'}", "--sources.0.max_docs=80",
                  "--num_shards=2", "--tokenizer.vocab_size=512", "--pack.seq_len=128", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation:" in result.stdout
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["steps"][0]["extra"]["docs_from/stdlib"] == 80
    assert summary["tokens_train"]["num_blocks"] > 100
    assert PackedDataset(tmp_path / "out" / "tokens" / "train")[0]["input_ids"].shape == (128,)


GIVEN_TOKENIZER_RUN = """
import sys
from data_prep.config import load_config
from data_prep.pipeline import run_pipeline
run_pipeline(load_config(sys.argv[1], sys.argv[2:]))
print(sorted({"transformers", "torch"} & set(sys.modules)))
"""


def test_a_given_tokenizer_is_copied_and_packs_exactly_as_when_it_was_trained(data_dir, tmp_path):
    """`tokenizer.path`: the run copies that tokenizer and packs the same token shards, byte for byte, as the run
    that trained it, and the pipeline's process never imports transformers (or torch) to do it."""
    out = tmp_path / "given"
    trained = data_dir / "tokenizer"
    overrides = [f"--output_dir={out}", "--num_shards=1", "--sources.0.max_docs=40", f"--tokenizer.path={trained}",
                 "--pack.seq_len=64", "--validation_fraction=0.1"]  # as conftest's data_dir, but the tokenizer given
    result = subprocess.run([sys.executable, "-c", GIVEN_TOKENIZER_RUN,
                             str(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"), *overrides],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    for path in trained.iterdir():
        assert (out / "tokenizer" / path.name).read_bytes() == path.read_bytes()
    packed = sorted(p.relative_to(data_dir) for p in (data_dir / "tokens").rglob("*") if p.is_file())
    assert packed and packed == sorted(p.relative_to(out) for p in (out / "tokens").rglob("*") if p.is_file())
    for relative in packed:
        assert (out / relative).read_bytes() == (data_dir / relative).read_bytes(), relative
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert report["source"] == str(trained) and report["trained_on_bytes"] is None
    assert report["vocab_size"] == 512


def test_a_tokenizer_budget_smaller_than_the_corpus_samples_all_of_it_evenly(finished_run, tmp_path):
    import dataclasses

    from data_prep.io import write_docs
    from data_prep.pipeline import _round_robin, tokenizer_sample_share

    cfg = finished_run[0]
    files = sorted((Path(cfg.output_dir) / "documents" / "train").glob("*.jsonl.zst"))
    total = sum(len(t.encode("utf-8")) for t in _round_robin(files))
    assert tokenizer_sample_share(cfg) == 1.0  # the default budget holds the whole corpus: every document
    small = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, train_bytes=total // 4))
    share = tokenizer_sample_share(small)
    assert 0.2 < share < 0.4  # a quarter, with the margin and the held-out estimate

    # The draw itself, on fixed ids (the run's ids hold its temporary path): 3 shards of 400 documents.
    shards = [tmp_path / f"{s}.jsonl.zst" for s in range(3)]
    for s, path in enumerate(shards):
        write_docs(path, ({"id": f"src/file{s}-{i}.py", "text": f"{s}-{i}"} for i in range(400)))
    everything = list(_round_robin(shards))
    sample = list(_round_robin(shards, 0.25))
    positions = [everything.index(text) for text in sample]
    assert 0.2 < len(sample) / len(everything) < 0.3
    assert positions == sorted(positions)  # the same order, a subset
    tenths = {10 * p // len(everything) for p in positions}
    assert tenths == set(range(10))  # from every part of the corpus
    assert {text.split("-")[0] for text in sample} == {"0", "1", "2"}  # and every shard


def test_a_tar_archive_packs_the_same_tokens_as_the_folder_it_was_made_from(corpus_dir, tmp_path):
    import tarfile

    folder = corpus_dir / "code"
    archive = tmp_path / "code.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"code/{path.name}")
    runs = {}
    for name, paths in (("folder", [str(folder)]), ("archive", [str(archive)])):
        source = {"name": "code", "paths": paths, "kind": "code", "extensions": [".py"]}
        config = write_config(corpus_dir, tmp_path / name / "out", sources=[source], validation_fraction=0.0,
                              num_shards=2, decontam={})
        cfg = load_config(config)
        reports = {r.step: r for r in run_pipeline(cfg)}
        runs[name] = cfg, reports
    (folder_cfg, folder_reports), (archive_cfg, archive_reports) = runs["folder"], runs["archive"]
    assert archive_reports["read"].docs_out == folder_reports["read"].docs_out == len(list(folder.glob("*.py")))
    first = next(read_docs(next((Path(archive_cfg.output_dir) / "documents" / "train").glob("*.jsonl.zst"))))
    assert first["id"].startswith(f"{archive}:code/") and first["id"].endswith(".py")
    for split_file in ("tokens/train/00000-of-00002.bin", "tokens/train/00001-of-00002.bin"):
        assert (Path(folder_cfg.output_dir) / split_file).read_bytes() == \
            (Path(archive_cfg.output_dir) / split_file).read_bytes()

