"""Two small labelled tasks made from the embedded corpus (the interpreter's standard library), offline.

    python -m data_prep.tasks --output=outputs/tasks/stdlib [--max_per_label=N] [--validation_fraction=F]

- `package/` (sequence classification, `{"text", "label"}`): the source of a function or method from one of
  `PACKAGES`, labelled with the standard-library package it belongs to ("email", "asyncio", ...). The model
  has to recognise a package from its vocabulary and idioms: message headers, event loops, widgets, XML
  nodes, test assertions, worker processes.
- `calls/` (token classification, `{"tokens", "tags"}`, BIO tags as in CoNLL-2003): one logical line of
  Python from the same packages, split by the `tokenize` module; the entities are CALL (the dotted name a
  call invokes: `os.path.join` in `os.path.join(a, b)`, three NAME and two "." tokens) and DEF (the name a
  `def` or `class` statement defines). Whether a dotted name is a CALL depends on the "(" after it, so
  the task rewards reading to the right, as a bidirectional encoder does.

Labels come from the files' paths and from Python's own tokenizer, so they are exact. Examples are
deduplicated, assigned to train or validation by a hash of their text (stable whatever else is in the
set), and in `package/` capped at `max_per_label` per package in train (the validation split is
not capped, so class frequencies there follow the corpus). `report.json` has the counts.

These are the same files the stdlib pretraining corpus holds: a model pretrained on it has seen the text,
never the labels.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import keyword
import sys
import sysconfig
import textwrap
import tokenize
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli import ConfigError, parse_args, report_error
from data_prep.documents import read_documents
from data_prep.io import atomic_write_text
from data_prep.sources import stdlib_files

PACKAGES = ("asyncio", "email", "multiprocessing", "tkinter", "unittest", "xml")
SKIPPED_TOKENS = (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
                  tokenize.ENDMARKER)


def split_of(text: str, validation_fraction: float) -> str:
    position = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if position < validation_fraction else "train"


def package_files() -> list[tuple[str, Path]]:
    """(package, file) for the standard-library sources of `PACKAGES`, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, _ = stdlib_files()
    return [(path.relative_to(root).parts[0], path) for path in files
            if len(path.relative_to(root).parts) > 1 and path.relative_to(root).parts[0] in PACKAGES]


def function_sources(source: str, min_chars: int = 80, max_chars: int = 1000) -> list[str]:
    """The dedented source of every function and method, truncated to `max_chars`; short ones left out."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            text = textwrap.dedent(ast.get_source_segment(source, node, padded=True) or "")
            if len(text) >= min_chars:
                found.append(text[:max_chars])
    return found


def tag_line(tokens: list[tokenize.TokenInfo]) -> list[str]:
    """BIO tags of one logical line's tokens: CALL for the dotted name before "(", DEF for a defined name."""
    tags = ["O"] * len(tokens)
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME or keyword.iskeyword(token.string):
            continue
        if i > 0 and tokens[i - 1].string in ("def", "class"):
            tags[i] = "B-DEF"
        elif i + 1 < len(tokens) and tokens[i + 1].string == "(" and tags[i] == "O":
            start = i  # extend left over ". NAME" pairs: os.path.join
            while (start >= 2 and tokens[start - 1].string == "." and tokens[start - 2].type == tokenize.NAME
                   and not keyword.iskeyword(tokens[start - 2].string)):
                start -= 2
            tags[start] = "B-CALL"
            for j in range(start + 1, i + 1):
                tags[j] = "I-CALL"
    return tags


def tagged_lines(source: str, max_tokens: int = 48, max_token_chars: int = 30) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) of each single-line logical line of `source` with 3 to `max_tokens` tokens."""
    lines, current = [], []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NEWLINE:
                lines.append(current)
                current = []
            elif token.type not in SKIPPED_TOKENS:
                current.append(token)
    except (tokenize.TokenError, SyntaxError):
        pass
    kept = []
    for line in lines:
        if not 3 <= len(line) <= max_tokens or line[0].start[0] != line[-1].end[0]:
            continue  # continued over several physical lines
        if any(len(token.string) > max_token_chars for token in line):
            continue
        kept.append(([token.string for token in line], tag_line(line)))
    return kept


def build_tasks(output: str | Path, *, max_per_label: int = 300, max_lines: int = 4000,
                validation_fraction: float = 0.15, files: list[tuple[str, Path]] | None = None) -> dict:
    """Write package/{train,validation}.jsonl, calls/{train,validation}.jsonl and report.json under `output`.

    `files`: (package, path) pairs to read instead of `package_files()`.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in (0, 1), got {validation_fraction}")
    package = {"train": [], "validation": []}
    calls = {"train": [], "validation": []}
    per_label: Counter = Counter()
    seen: set[str] = set()
    counts: Counter = Counter()
    for name, path in files if files is not None else package_files():
        try:
            source = next(read_documents(path))  # a source file is one document
            functions = function_sources(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["unparseable_files"] += 1
            continue
        for text in functions:
            if text in seen:
                continue
            seen.add(text)
            split = split_of(text, validation_fraction)
            if split == "train" and per_label[name] >= max_per_label:
                continue
            per_label[name] += split == "train"
            package[split].append({"text": text, "label": name})
        for tokens, tags in tagged_lines(source):
            key = " ".join(tokens)
            if key in seen:
                continue
            seen.add(key)
            calls[split_of(key, validation_fraction)].append({"tokens": tokens, "tags": tags})
    # Lines are many; keep an even sample across files by taking every k-th, in order.
    for split, records in calls.items():
        limit = max_lines if split == "train" else round(max_lines * validation_fraction / (1 - validation_fraction))
        step = max(1, len(records) // limit)
        calls[split] = records[::step][:limit]
    output = Path(output)
    for task, splits in (("package", package), ("calls", calls)):
        for split, records in splits.items():
            atomic_write_text(output / task / f"{split}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    entities = Counter(tag[2:] for records in calls.values() for r in records for tag in r["tags"] if tag[0] == "B")
    report = {
        "packages": list(PACKAGES),
        "package": {split: dict(sorted(Counter(r["label"] for r in records).items()))
                    for split, records in package.items()},
        "calls": {split: len(records) for split, records in calls.items()},
        "entities": dict(sorted(entities.items())),
        "max_per_label": max_per_label, "validation_fraction": validation_fraction,
        "counts": dict(counts),
    }
    atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class TasksArguments:
    output: str = field(default="", metadata={"help": "folder for package/, calls/ and report.json"})
    max_per_label: int = field(default=300, metadata={"help": "package task: training examples per package"})
    max_lines: int = field(default=4000, metadata={"help": "calls task: training lines"})
    validation_fraction: float = 0.15


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((TasksArguments,), sys.argv[1:] if argv is None else argv,
                             prog="python -m data_prep.tasks", description=__doc__.split("\n\n")[0],
                             path_keys=("output",))
        if not args.output:
            raise ConfigError("output: required (the folder to write the tasks to)")
        report = build_tasks(args.output, max_per_label=args.max_per_label, max_lines=args.max_lines,
                             validation_fraction=args.validation_fraction)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
