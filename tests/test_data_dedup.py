"""Exact and near-duplicate removal across shards, and eval-set decontamination."""

import json
import random
import string
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.utils.text import TextNormConfig, simplify_text

from data_prep.config import ConfigError, DecontamConfig, DedupConfig, MinHashConfig
from data_prep.decontam import Decontaminator
from data_prep.dedup import (
    DedupSignatures,
    MinHasher,
    load_removals,
    normalized_words,
    plan_removals,
)


def random_words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(count)]


def as_text(words: list[str]) -> str:
    """Words as prose: twelve to a line, a full stop at each line end."""
    return "\n".join(" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12))


def change_words(words: list[str], positions: list[int], seed: int) -> list[str]:
    replacements = random_words(len(positions), seed)
    changed = list(words)
    for position, word in zip(positions, replacements):
        changed[position] = word
    return changed


def jaccard(a: str, b: str, cfg: MinHashConfig | None = None) -> float:
    hasher = MinHasher(cfg or MinHashConfig())
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def run_dedup(tmp_path: Path, shards: list[list[tuple[int, str]]], cfg: DedupConfig | None = None):
    """Stages 1 and 2 over `shards` (lists of (index, text)); returns counts, removals and kept docs per shard."""
    cfg = cfg or DedupConfig()
    signature_paths, removal_paths = [], []
    for k, docs in enumerate(shards):
        signatures = DedupSignatures(cfg)
        for index, text in docs:
            signatures.add(index, text)
        signature_paths.append(tmp_path / f"signatures/{k:05d}.sig")
        removal_paths.append(tmp_path / f"removals/{k:05d}.removals")
        signatures.save(signature_paths[-1])
    counts = plan_removals(signature_paths, cfg, removal_paths)
    loaded = [load_removals(p) for p in removal_paths]
    reasons = [{i: removal.reason for i, removal in shard.items()} for shard in loaded]
    kept = [{i: (removal.kept_shard, removal.kept_index) for i, removal in shard.items()} for shard in loaded]
    return counts, reasons, kept


# ---------------------------------------------------------------------------------------------
# Normalisation and signatures
# ---------------------------------------------------------------------------------------------

def test_normalized_words_match_datatrove_simplify_text():
    from pydoc_data.topics import topics

    texts = list(topics.values())[:40] + [
        "Café NAÏVE Ångström, ﬁ ½ Straße; «quoted» — dash",
        "tab\tnbsp\u00a0em\u2003space x.y 1.5e3 ١٢٣ 12,5 3.14",
        "Greek question mark\u037e ano teleia\u0387 done",
    ]
    for numbers in (False, True):
        for text in texts:
            expected = simplify_text(text, TextNormConfig(norm_numbers=numbers)).split()
            assert [w.decode() for w in normalized_words(text, numbers)] == expected, text[:60]
    assert normalized_words("Hello, World! 42") == [b"hello", b"world", b"42"]
    assert normalized_words("Hello, World! 42", normalize_numbers=True) == [b"hello", b"world", b"0"]


def test_signatures_are_deterministic_and_follow_the_seed(tmp_path):
    texts = [as_text(random_words(300, seed)) for seed in range(5)]

    def saved(seed: int, name: str) -> dict[str, np.ndarray]:
        signatures = DedupSignatures(DedupConfig(minhash=MinHashConfig(seed=seed)))
        for index, text in enumerate(texts):
            signatures.add(index * 2, text)
        signatures.save(tmp_path / name)
        with np.load(tmp_path / name) as data:
            return {key: data[key] for key in data.files}

    first, again, other_seed = saved(1, "a.npz"), saved(1, "b.npz"), saved(2, "c.npz")
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert first["bands"].shape == (5, 14) and first["index"].tolist() == [0, 2, 4, 6, 8]
    assert np.array_equal(first["exact"], other_seed["exact"])  # the exact hash does not depend on the seed
    assert not np.any(first["bands"] == other_seed["bands"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "c.npz"]  # no temporary files left


def test_signature_agreement_estimates_jaccard_similarity():
    words = random_words(1000, seed=7)
    base = as_text(words)
    half = as_text(change_words(words, list(range(0, 1000, 14)), seed=8))
    hasher = MinHasher(MinHashConfig())
    similarity = jaccard(base, half)
    assert 0.35 < similarity < 0.65
    agreement = float(np.mean(hasher.signature(base) == hasher.signature(half)))
    assert abs(agreement - similarity) < 0.15
    unrelated = as_text(random_words(1000, seed=9))
    assert np.mean(hasher.signature(base) == hasher.signature(unrelated)) < 0.05
    assert hasher.signature("!!! ...") is None


# ---------------------------------------------------------------------------------------------
# Exact and near duplicates
# ---------------------------------------------------------------------------------------------

def test_exact_duplicates_removed_and_first_occurrence_kept(tmp_path):
    words = random_words(300, seed=1)
    original = as_text(words)
    shouted = "  " + original.upper().replace("\n", "\n\n\t ").replace(" ", "   ")
    punctuated = ", ".join(words)  # same words, other punctuation: not an exact copy
    other_a, other_b = as_text(random_words(300, seed=2)), as_text(random_words(300, seed=3))
    shards = [
        [(0, original), (1, other_a), (4, shouted)],
        [(2, other_b), (3, original), (7, punctuated)],
    ]
    counts, removals, kept = run_dedup(tmp_path, shards)
    assert removals == [{4: "exact_duplicate"}, {3: "exact_duplicate", 7: "near_duplicate"}]
    assert kept == [{4: (0, 0)}, {3: (0, 0), 7: (0, 0)}]
    assert counts == {"exact_duplicate": 2, "near_duplicate": 1, "clusters": 1}


def test_many_copies_keep_the_first_of_each(tmp_path):
    texts = [as_text(random_words(40, seed)) for seed in range(4)]
    shards = [[(i, texts[(i + k) % 4]) for i in range(150)] for k in range(3)]
    counts, removals, kept = run_dedup(tmp_path, shards)
    assert removals[0] == dict.fromkeys(range(4, 150), "exact_duplicate")
    assert kept[0] == {i: (0, i % 4) for i in range(4, 150)}
    assert kept[2] == {i: (0, (i + 2) % 4) for i in range(150)}
    assert counts == {"exact_duplicate": 446, "near_duplicate": 0, "clusters": 4}


def test_near_duplicates_removed_across_shards_and_dissimilar_kept(tmp_path):
    words = random_words(1000, seed=11)
    base = as_text(words)
    near = as_text(change_words(words, [50, 300, 555, 700, 951], seed=12))
    far = as_text(change_words(words, list(range(0, 1000, 10)), seed=13))
    assert jaccard(base, near) > 0.9 and jaccard(base, far) < 0.4
    shards = [
        [(0, as_text(random_words(1000, seed=14))), (1, base)],
        [(0, far)],
        [(0, as_text(random_words(1000, seed=15))), (1, near)],
    ]
    counts, removals, kept = run_dedup(tmp_path, shards)
    assert removals == [{}, {}, {1: "near_duplicate"}]
    assert kept[2] == {1: (0, 1)}
    assert counts == {"exact_duplicate": 0, "near_duplicate": 1, "clusters": 1}


def test_chain_of_near_duplicates_is_one_cluster_that_keeps_its_first_document(tmp_path):
    # Each document is the previous one with ten more words changed: neighbours are near-duplicates, the ends of
    # the chain are not (they share no band), so only clustering puts them together.
    chain = [random_words(1000, seed=21)]
    for step in range(7):
        chain.append(change_words(chain[-1], list(range(step * 13, 1000, 100)), seed=22 + step))
    texts = [as_text(words) for words in chain]
    hasher = MinHasher(MinHashConfig())
    assert not np.any(hasher.band_keys(texts[0]) == hasher.band_keys(texts[-1]))
    assert jaccard(texts[0], texts[-1]) < 0.5

    unrelated = as_text(random_words(1000, seed=30))
    shards = [[(0, texts[5]), (1, unrelated), (2, texts[0])],
              [(0, texts[7]), (3, texts[1]), (4, texts[6])],
              [(0, texts[2]), (1, texts[4]), (2, texts[3])]]
    counts, removals, kept = run_dedup(tmp_path, shards)
    assert removals == [{2: "near_duplicate"}, dict.fromkeys([0, 3, 4], "near_duplicate"),
                        dict.fromkeys([0, 1, 2], "near_duplicate")]
    assert {source for shard in kept for source in shard.values()} == {(0, 0)}  # all point at texts[5]
    assert counts == {"exact_duplicate": 0, "near_duplicate": 7, "clusters": 1}


def test_distinct_stdlib_files_are_all_kept(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "encodings", "site-packages", "__pycache__"}
    files = [p for p in sorted(root.rglob("*.py"))
             if 2_000 < p.stat().st_size < 20_000 and not skip & set(p.relative_to(root).parts)][:200]
    assert len(files) == 200
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    shards = [[(i, texts[i]) for i in range(k, len(texts), 4)] for k in range(4)]
    counts, removals, kept = run_dedup(tmp_path, shards)  # a document's index is its position in `files`
    merged = [(str(files[i]), str(files[j])) for shard in kept for i, (_, j) in shard.items()]
    assert removals == [{}, {}, {}, {}], f"distinct files merged: {merged}"
    assert counts == {"exact_duplicate": 0, "near_duplicate": 0, "clusters": 0}


def log_lines(seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(
        f"request {rng.randint(1000, 99999)} served in {rng.randint(1, 999)} ms status {rng.choice([200, 404, 500])}"
        f" from 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} size {rng.randint(10, 9999)}"
        for _ in range(80)
    )


def test_documents_differing_only_in_numbers_are_kept_unless_numbers_are_normalized(tmp_path):
    first, second = log_lines(seed=31), log_lines(seed=32)
    assert normalized_words(first, normalize_numbers=True) == normalized_words(second, normalize_numbers=True)
    counts, removals, _ = run_dedup(tmp_path / "default", [[(0, first)], [(0, second)]])
    assert removals == [{}, {}] and counts["clusters"] == 0

    cfg = DedupConfig(minhash=MinHashConfig(normalize_numbers=True))
    counts, removals, kept = run_dedup(tmp_path / "numbers", [[(0, first)], [(0, second)]], cfg)
    assert removals == [{}, {0: "near_duplicate"}] and kept[1] == {0: (0, 0)}


def test_short_documents_and_documents_without_words(tmp_path):
    shards = [[(0, "Hello, world!"), (1, "hello world"), (2, "hello there"), (3, "!!!"), (4, "???")]]
    counts, removals, kept = run_dedup(tmp_path, shards)
    assert removals == [{1: "near_duplicate"}] and kept == [{1: (0, 0)}]


def test_exact_only_and_near_only_configs(tmp_path):
    words = random_words(600, seed=41)
    original, copy = as_text(words), as_text(words).upper()
    near = as_text(change_words(words, [10, 200, 400], seed=42))
    shards = [[(0, original), (1, copy)], [(0, near)]]
    no_minhash = DedupConfig(minhash=MinHashConfig(enabled=False))
    counts, removals, _ = run_dedup(tmp_path / "exact", shards, no_minhash)
    assert removals == [{1: "exact_duplicate"}, {}]
    no_exact = DedupConfig(exact=False)
    counts, removals, _ = run_dedup(tmp_path / "near", shards, no_exact)
    assert removals == [{1: "near_duplicate"}, {0: "near_duplicate"}]
    assert counts == {"exact_duplicate": 0, "near_duplicate": 2, "clusters": 1}


def test_removal_files_round_trip_and_bad_inputs_fail_clearly(tmp_path):
    text = as_text(random_words(100, seed=51))
    _, removals, kept = run_dedup(tmp_path, [[(3, text), (9, text)], [], [(0, text)]])
    assert removals == [{9: "exact_duplicate"}, {}, {0: "exact_duplicate"}]
    assert kept == [{9: (0, 3)}, {}, {0: (0, 3)}]
    assert all(isinstance(i, int) and isinstance(r, str) for shard in removals for i, r in shard.items())
    # Reading again gives the same answer.
    assert {i: r.reason for i, r in load_removals(tmp_path / "removals/00002.removals").items()} == {
        0: "exact_duplicate"}

    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.npz: unreadable dedup removal file"):
        load_removals(tmp_path / "broken.npz")

    # Signatures computed under other settings are refused by name, not silently mixed.
    with pytest.raises(ConfigError, match="n_grams=5 \\(config: 7\\)"):
        cfg = DedupConfig(minhash=MinHashConfig(n_grams=7))
        plan_removals([tmp_path / "signatures/00000.sig"], cfg, [tmp_path / "r.npz"])
    with pytest.raises(ValueError, match="missing.npz: unreadable dedup signature file"):
        plan_removals([tmp_path / "missing.npz"], DedupConfig(), [tmp_path / "r.npz"])

    signatures = DedupSignatures(DedupConfig())
    signatures.add(5, text)
    with pytest.raises(ValueError, match="index 5 follows 5"):
        signatures.add(5, text)
    with pytest.raises(ConfigError, match="dedup.minhash.n_grams: must be >= 1"):
        MinHashConfig(n_grams=0)


# ---------------------------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------------------------

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def eval_words() -> list[str]:
    return random_words(40, seed=61)


def test_doc_sharing_a_13_gram_with_an_eval_set_is_flagged_and_12_words_are_not(tmp_path, eval_words):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": " ".join(eval_words)},
                                                      {"text": as_text(random_words(40, seed=62))}])
    decontam = Decontaminator(DecontamConfig(eval_files=[str(eval_file)]))
    assert decontam.enabled
    before, after = random_words(100, seed=63), random_words(100, seed=64)
    shares_13 = " ".join(before + eval_words[10:23] + after)
    shares_12 = " ".join(before + eval_words[10:22] + after)
    shares_12_twice = " ".join(before + eval_words[0:12] + after + eval_words[12:24])
    assert decontam.check(shares_13) == "contaminated:eval.jsonl"
    assert decontam.check(shares_12) is None
    assert decontam.check(shares_12_twice) is None
    # Case and punctuation do not hide a match.
    disguised = ", ".join(w.title() for w in eval_words[20:33])
    assert decontam.check(f"Intro: \"{disguised}!\" -- the end.") == "contaminated:eval.jsonl"


def test_short_eval_documents_parquet_and_txt_files(tmp_path, eval_words):
    short = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is the capital of France?"}])
    table = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"question": [" ".join(eval_words)]}), table)
    passage = tmp_path / "passage.txt"
    passage.write_text(as_text(random_words(30, seed=65)), encoding="utf-8")
    decontam = Decontaminator(DecontamConfig(eval_files=[str(short), str(table), str(passage)],
                                             text_field="question"))
    assert decontam.check("Then they asked: what is the capital of France, and left.") == "contaminated:qa.jsonl"
    assert decontam.check("what is the capital of spain") is None
    assert decontam.check(" ".join(["intro"] + eval_words[:13])) == "contaminated:mc.parquet"
    assert decontam.check(passage.read_text(encoding="utf-8").upper()) == "contaminated:passage.txt"
    assert decontam.check(as_text(random_words(500, seed=66))) is None


def test_decontamination_config_errors_name_the_file(tmp_path, eval_words):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": " ".join(eval_words)}])
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=r"decontam\.eval_files\.1: .*missing\.jsonl: eval file not found"):
        Decontaminator(DecontamConfig(eval_files=[str(good), str(missing)]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"decontam\.eval_files\.0: .*broken\.jsonl:2: .*malformed_json"):
        Decontaminator(DecontamConfig(eval_files=[str(broken)]))
    with pytest.raises(ConfigError, match=r"decontam\.eval_files\.0: .*good\.jsonl:1: .*missing_text_field"):
        Decontaminator(DecontamConfig(eval_files=[str(good)], text_field="question"))
    with pytest.raises(ConfigError, match="decontam.ngram: must be >= 1"):
        DecontamConfig(ngram=0)
    off = Decontaminator(DecontamConfig())
    assert not off.enabled and off.check(" ".join(eval_words)) is None
