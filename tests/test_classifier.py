"""The stdlib labelled tasks (data_prep/tasks.py), their datasets (training/classification.py) and scores
(evaluation/classification.py): labels, BIO entities and CoNLL entity F1, macro-F1."""

import io
import json
import tokenize

import pytest
from sklearn.metrics import f1_score

from data_prep.tasks import build_tasks, package_files, tag_line, tagged_lines
from evaluation.classification import accuracy, entities, entity_scores, macro_f1
from training.classification import SequenceDataset, TokenDataset, align_words, read_records


def line_tokens(source: str) -> list[tokenize.TokenInfo]:
    skip = (tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.NL, tokenize.COMMENT)
    return [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("x = os.path.join(a, b.c)", "O O B-CALL I-CALL I-CALL I-CALL I-CALL O O O O O O O"),
        ("def f(x): return g(x)", "O B-DEF O O O O O B-CALL O O O"),
        ("class C(Base): pass", "O B-DEF O O O O O"),
        ("if (a): f()(b)", "O O O O O B-CALL O O O O O"),
        ("obj().method(1)", "B-CALL O O O B-CALL O O O"),
    ],
)
def test_calls_and_definitions_are_tagged_from_pythons_tokenizer(source, expected):
    tokens = line_tokens(source)
    assert len(tokens) == len(expected.split()), [t.string for t in tokens]
    assert tag_line(tokens) == expected.split()


def test_tagged_lines_keep_single_line_statements():
    source = "def f(a,\n      b):\n    return g(a)  # note\nx = 1\n"
    assert tagged_lines(source) == [(["return", "g", "(", "a", ")"], ["O", "B-CALL", "O", "O", "O"]),
                                    (["x", "=", "1"], ["O", "O", "O"])]


def test_build_tasks_labels_functions_by_package_and_splits_by_hash(tmp_path):
    files = [(name, path) for name, path in package_files() if path.name in ("message.py", "events.py")]
    assert {name for name, _ in files} == {"asyncio", "email"}
    report = build_tasks(tmp_path / "a", max_per_label=1000, max_lines=50, validation_fraction=0.3, files=files)
    again = build_tasks(tmp_path / "b", max_per_label=1000, max_lines=50, validation_fraction=0.3, files=files)
    assert report == again
    for task in ("package", "calls"):
        for split in ("train", "validation"):
            assert (tmp_path / "a" / task / f"{split}.jsonl").read_text() == \
                   (tmp_path / "b" / task / f"{split}.jsonl").read_text()
    records = [json.loads(line) for line in (tmp_path / "a" / "package" / "train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in records} == {"asyncio", "email"}
    assert any("def get_payload" in r["text"] and r["label"] == "email" for r in records + [
        json.loads(line) for line in (tmp_path / "a" / "package" / "validation.jsonl").read_text().splitlines()])
    assert report["calls"]["train"] == 50 and report["entities"]["CALL"] > 0 and report["entities"]["DEF"] > 0


def test_entities_follow_conlleval():
    assert entities(["B-CALL", "I-CALL", "O", "B-DEF"]) == {("CALL", 0, 1), ("DEF", 3, 3)}
    assert entities(["I-CALL", "I-CALL", "B-CALL"]) == {("CALL", 0, 1), ("CALL", 2, 2)}  # I- opens an entity
    assert entities(["B-CALL", "I-DEF", "I-DEF"]) == {("CALL", 0, 0), ("DEF", 1, 2)}  # a type change ends one
    with pytest.raises(ValueError, match="^tags: 'X-CALL'"):
        entities(["X-CALL"])


def test_entity_scores_count_exact_matches_only():
    gold = [["B-CALL", "I-CALL", "O", "B-DEF"], ["O", "B-CALL"]]
    predicted = [["B-CALL", "O", "O", "B-DEF"], ["O", "B-CALL"]]  # one boundary wrong
    scores = entity_scores(gold, predicted)
    assert scores["entities"] == 3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["per_type"]["CALL"]["f1"] == pytest.approx(0.5) and scores["per_type"]["DEF"]["f1"] == 1.0
    assert entity_scores(gold, [["O"] * 4, ["O"] * 2])["f1"] == 0.0


def test_macro_f1_and_accuracy_match_scikit_learn():
    gold = ["a", "b", "c", "a", "b", "a", "c", "c"]
    predicted = ["a", "b", "b", "a", "c", "a", "c", "a"]
    assert macro_f1(gold, predicted) == pytest.approx(f1_score(gold, predicted, average="macro"))
    labels = ["a", "b", "c", "d"]  # a label nobody predicted nor has scores 0, as scikit-learn does
    assert macro_f1(gold, predicted, labels) == pytest.approx(
        f1_score(gold, predicted, labels=labels, average="macro", zero_division=0))
    assert accuracy(gold, predicted) == 5 / 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from test_data_tokenizer import stdlib_texts

    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_tokenizer

    return train_tokenizer(stdlib_texts(60_000), TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("t") / "tok")


def test_words_align_to_their_first_sub_token(tokenizer):
    words = ["os", ".", "path", ".", "join", "(", "xyzzyplughword", ")"]
    ids, first = align_words(tokenizer, words, max_length=64)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == " ".join(words)
    assert first[0] == 0 and all(a < b for a, b in zip(first, first[1:]))
    assert pieces[first[6]].lstrip("Ġ").startswith("x")  # a word split in several pieces labels the first
    assert align_words(tokenizer, words, max_length=3)[1][-1] == -1  # cut off


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_datasets_refuse_unknown_labels_and_mismatched_tags(tokenizer, tmp_path):
    train = write(tmp_path / "train.jsonl", [{"text": "import os", "label": "a"}, {"text": "x = 1", "label": "b"}])
    records = read_records(train, ("text", "label"))
    dataset = SequenceDataset(records, tokenizer, {"a": 0, "b": 1}, max_length=8)
    assert dataset[0]["labels"] == 0 and dataset[0]["input_ids"][-1] == tokenizer.eos_token_id
    bad = write(tmp_path / "bad.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "zzz"}])
    with pytest.raises(ValueError, match=rf"^{bad}:2: label: 'zzz' is not one of the labels \['a', 'b'\]$"):
        SequenceDataset(read_records(bad, ("text", "label")), tokenizer, {"a": 0, "b": 1}, max_length=8)
    tags = write(tmp_path / "tags.jsonl", [{"tokens": ["f", "(", ")"], "tags": ["B-CALL", "O"]}])
    with pytest.raises(ValueError, match=rf"^{tags}:1: tags: 2 tags for 3 tokens$"):
        TokenDataset(read_records(tags, ("tokens", "tags")), tokenizer, {"O": 0, "B-CALL": 1}, max_length=8)
    with pytest.raises(ValueError, match=rf"^{train}:1: tokens: missing"):
        read_records(train, ("tokens", "tags"))
