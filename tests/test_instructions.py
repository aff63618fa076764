"""data_prep.instructions ("docstring -> function" examples from the train corpus) and the instruction jsonl
reader of training.finetune: extraction from known source, determinism, dedup, a prompt-hash split that
does not move, train documents only, and bad lines reported as file:line plus the field."""

import ast
import json
from collections import Counter
from pathlib import Path

import pytest

from data_prep.instructions import (
    ExtractionLimits,
    build_instruction_set,
    collect_examples,
    examples_from_source,
    main,
    split_of,
)
from data_prep.io import read_docs
from training.finetune import read_conversations

SOURCE = '''"""A module of small helpers."""

import functools


def add(a, b=1, *rest, scale: float = 1.0) -> float:
    """Add a and b, then scale the sum.

    Extra positional values are ignored.
    """
    total = a + b
    return total * scale


@functools.lru_cache(maxsize=None)
def fib(n):
    """Return the n-th Fibonacci number, memoised."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


async def fetch(url, timeout=10):
    """Fetch url and return the body of the response as text."""
    async with session(url, timeout) as response:
        return await response.text()


def _private(x):
    """A private helper that no prompt should mention."""
    return x + 1 if x else x - 1


def undocumented(x):
    return x * 2 + 1 - 3 * x // 4 + 100


def stub():
    """A function whose body is only this docstring."""


def tiny():
    """A real docstring on a function too short to teach."""
    return 1


def inline(x): "An inline docstring that cannot be cut out cleanly."; return x * 2 + 1 - 3 * x // 4


def marker():
    """Return the text that ends a document in the packed data."""
    return "<|endoftext|>" + "some more padding text here"


class Thing:
    def method(self):
        """A method: its prompt would need the class around it."""
        return self.value * 2 + self.offset - 1
'''


def test_examples_from_a_known_snippet():
    skipped = Counter()
    examples = examples_from_source(SOURCE, "mod.py:1", skipped=skipped)
    assert [example.id for example in examples] == ["mod.py:1#add", "mod.py:1#fib", "mod.py:1#fetch"]
    add, fib, fetch = examples
    assert add.prompt == ("Write a Python function `add(a, b=1, *rest, scale: float=1.0) -> float` that does the "
                          "following:\nAdd a and b, then scale the sum.\n\nExtra positional values are ignored.")
    assert add.response == ("def add(a, b=1, *rest, scale: float = 1.0) -> float:\n"
                            "    total = a + b\n    return total * scale")
    assert fib.response.startswith("@functools.lru_cache(maxsize=None)\ndef fib(n):\n    if n < 2:")
    assert fetch.prompt.startswith("Write a Python async function `fetch(url, timeout=10)` that does the following:\n")
    assert skipped == {"no_body": 2, "too_short": 1, "special_token_text": 1}  # stub, inline; tiny; marker
    record = add.to_record()
    assert record == {"id": "mod.py:1#add", "messages": [{"role": "user", "content": add.prompt},
                                                         {"role": "assistant", "content": add.response}]}


def test_responses_are_the_functions_without_their_docstrings():
    for example in examples_from_source(SOURCE):
        tree = ast.parse(example.response)
        assert len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(tree.body[0]) is None
        assert example.prompt.split("\n", 1)[1] not in example.response


def test_limits_decide_what_is_too_short_or_too_long():
    assert [e.id for e in examples_from_source(SOURCE, limits=ExtractionLimits(max_response_chars=100))] == ["#add"]
    loose = ExtractionLimits(min_docstring_chars=1, min_response_chars=1)
    assert "#tiny" in [e.id for e in examples_from_source(SOURCE, limits=loose)]


def test_collection_is_deterministic_deduplicated_and_survives_bad_documents():
    renamed = SOURCE.replace("def fib(n):", "def fibonacci(n):")  # one new prompt; add and fetch repeat
    documents = [{"id": "a.py:1", "kind": "code", "text": SOURCE}, {"id": "b.txt:1", "kind": "text", "text": "prose"},
                 {"id": "c.py:1", "kind": "code", "text": "def broken(:\n    pass"},
                 {"id": "d.py:1", "kind": "code", "text": renamed}, {"id": "e.py:1", "kind": "code", "text": "x\x00"}]
    examples, counts = collect_examples(documents)
    assert [e.id for e in examples] == ["a.py:1#add", "a.py:1#fib", "a.py:1#fetch", "d.py:1#fibonacci"]
    assert counts["documents"] == 5 and counts["not_code"] == 1 and counts["unparseable"] == 2
    assert counts["duplicate_prompt"] == 2 and counts["examples"] == 4
    assert collect_examples(documents) == (examples, counts)
    capped, _ = collect_examples(documents, max_examples=2)
    assert capped == examples[:2]
    from_texts, _ = collect_examples([SOURCE, renamed])  # plain texts work too
    assert [e.prompt for e in from_texts] == [e.prompt for e in examples]


def test_split_depends_on_the_prompt_alone(tmp_path):
    prompts = [f"Write a Python function `f{i}()` that does the following:\nReturn {i}." for i in range(400)]
    splits = [split_of(prompt, 0.25) for prompt in prompts]
    assert splits == [split_of(prompt, 0.25) for prompt in prompts]
    assert 60 < splits.count("validation") < 140
    assert all(split_of(prompt, 0.0) == "train" for prompt in prompts)
    sources = [f'def f{i}():\n    """Return the number {i} to the caller."""\n    total = {i} * 2 - {i}\n'
               "    return total\n" for i in range(60)]
    full = build_instruction_set(sources, tmp_path / "full", validation_fraction=0.3)
    half = build_instruction_set(sources[::2], tmp_path / "half", validation_fraction=0.3)
    assert full["train"] + full["validation"] == 60 and 0 < full["validation"] < 60

    def ids(folder: Path, split: str) -> set[str]:
        return {json.loads(line)["messages"][0]["content"] for line in (folder / f"{split}.jsonl").open()}

    assert ids(tmp_path / "half", "validation") <= ids(tmp_path / "full", "validation")
    assert ids(tmp_path / "half", "train") <= ids(tmp_path / "full", "train")
    assert half["train"] + half["validation"] == 30


def test_a_data_prep_output_gives_examples_from_train_documents_only(data_dir, tmp_path):
    report = build_instruction_set(data_dir, tmp_path / "a", validation_fraction=0.2)
    assert report["train"] > 5 and report["train"] + report["validation"] == report["counts"]["examples"]
    train_ids = {doc["id"] for shard in sorted((data_dir / "documents" / "train").glob("*.jsonl.zst"))
                 for doc in read_docs(shard)}
    held_out = {doc["id"] for shard in sorted((data_dir / "documents" / "validation").glob("*.jsonl.zst"))
                for doc in read_docs(shard)}
    assert held_out and report["counts"]["documents"] == len(train_ids)
    for split in ("train", "validation"):
        path = tmp_path / "a" / f"{split}.jsonl"
        assert len(read_conversations(path)) == report[split]  # the format training.finetune reads
        for record in map(json.loads, path.open()):
            document = record["id"].rsplit("#", 1)[0]
            assert document in train_ids and document not in held_out
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
            assert split_of(record["messages"][0]["content"], 0.2) == split
    build_instruction_set(data_dir, tmp_path / "b", validation_fraction=0.2)
    for name in ("train.jsonl", "validation.jsonl", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_writes_the_set_and_reports_bad_input_in_one_line(data_dir, tmp_path, capsys):
    assert main([f"--data_dir={data_dir}", f"--output={tmp_path / 'out'}", "--max_examples=4",
                 "--validation_fraction=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("instructions: ") and "documents" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"] + report["validation"] == 4 and report["max_examples"] == 4
    assert main([f"--data_dir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'x'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere' / 'documents' / 'train'}: no ")
    assert main([f"--data_dir={data_dir}", f"--output={tmp_path / 'x'}", "--validation_fraction=1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: validation_fraction: must be in [0, 1), got 1.5"
    assert main([f"--data_dir={data_dir}"]) == 2
    assert capsys.readouterr().err.strip() == "error: output: required key is missing"


GOOD = '{"prompt": "Say hi.", "response": "hi"}'


@pytest.mark.parametrize("line, message", [
    ("{not json", r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object, got list"),
    ('{"prompt": "p"}', r"expected a 'messages' list, or 'prompt' and 'response' fields"),
    ('{"prompt": "p", "response": 3}', r"response must be a string, got int"),
    ('{"prompt": "p", "response": "r", "system": ["s"]}', r"system must be a string"),
    ('{"messages": []}', r"messages must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
     r"messages\[1\]\.role must be one of"),
    ('{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "a"}]}',
     r"messages\[0\]\.content must be a string, got NoneType"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"messages has no assistant message"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "a"}]}', r"messages\[1\]\.role: a system message may only come first"),
])
def test_bad_instruction_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")  # the blank line still counts: the bad one is line 3
    with pytest.raises(ValueError, match=rf"^{path}:3: {message}"):
        read_conversations(path)


def test_good_instruction_lines_read_back(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(GOOD + "\n" + json.dumps({"system": "Be terse.", "prompt": "p", "response": "r", "id": 7}) + "\n")
    assert read_conversations(path) == [
        (f"{path}:1", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
        (f"{path}:2", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "p"},
                       {"role": "assistant", "content": "r"}])]
    with pytest.raises(ValueError, match="instruction file not found"):
        read_conversations(tmp_path / "missing.jsonl")
