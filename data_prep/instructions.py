"""Instruction examples from the training corpus: "docstring -> function" pairs for finetuning.

    python -m data_prep.instructions --data_dir=outputs/data/stdlib --output=outputs/instructions/stdlib \\
        [--max_examples=N] [--validation_fraction=F]

Every public module-level function with a docstring in the code documents of a data_prep run becomes
one example. The prompt names the function and its signature and gives the docstring; the response is
the function's source (decorators included) with the docstring removed, since the prompt already says
it and the model should learn to write the code, not to copy the prompt back:

    user:       Write a Python function `quote(s, safe='/')` that does the following:
                Quote the characters of s that are not safe.
    assistant:  def quote(s, safe='/'):
                    ...

Only `documents/train/` is read, so the held-out documents stay unseen by finetuning too. The output
is deterministic: documents in shard order, functions in source order, the first of identical prompts
kept, and an example's split decided by a hash of its prompt alone (adding or removing other examples
never moves it). Writes `train.jsonl` and `validation.jsonl` ({"id", "messages": [user, assistant]}
records, the format `training.finetune` reads) and `report.json` with the counts. Documents that do
not parse as Python are counted, not fatal.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli import ConfigError, parse_args, report_error
from data_prep.io import DOC_SHARD_SUFFIX, atomic_write_text, read_docs

PROMPT_TEMPLATE = "Write a Python {kind} `{signature}` that does the following:\n{docstring}"
# Text that a ChatML tokenizer would read as a control token (<|im_end|>, <|endoftext|>, ...):
# an example containing it could end its own turn early.
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class ExtractionLimits:
    """Which functions make useful examples: a real docstring and a body that is neither a stub nor a file."""

    min_docstring_chars: int = 20
    max_docstring_chars: int = 800
    min_response_chars: int = 40
    max_response_chars: int = 1500


@dataclass(frozen=True)
class InstructionExample:
    id: str
    prompt: str
    response: str

    def to_record(self) -> dict:
        return {"id": self.id, "messages": [{"role": "user", "content": self.prompt},
                                            {"role": "assistant", "content": self.response}]}


def _docstring_on_own_lines(lines: list[str], docstring: ast.stmt) -> bool:
    """True when nothing but the docstring sits on its lines, so dropping those lines removes exactly it."""
    before = lines[docstring.lineno - 1][: docstring.col_offset]
    after = lines[docstring.end_lineno - 1][docstring.end_col_offset:]
    return not before.strip() and not after.strip()


def _function_without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    docstring = node.body[0]
    if len(node.body) < 2 or not _docstring_on_own_lines(lines, docstring):
        return None  # a docstring-only stub, or `def f(): "doc"; return 1` on one line
    start = min([decorator.lineno for decorator in node.decorator_list] + [node.lineno])
    kept = lines[start - 1 : docstring.lineno - 1] + lines[docstring.end_lineno : node.end_lineno]
    return "\n".join(line.rstrip() for line in kept).strip("\n")


def examples_from_source(source: str, doc_id: str = "", limits: ExtractionLimits = ExtractionLimits(),
                         skipped: Counter | None = None) -> list[InstructionExample]:
    """The examples of one Python source text, in source order. Raises SyntaxError if it does not parse.

    `skipped`, when given, counts the documented public functions left out, by reason.
    """
    tree = ast.parse(source)
    skipped = skipped if skipped is not None else Counter()
    lines = source.splitlines()
    examples = []
    for node in tree.body:  # module level only: a method's prompt would lack its class
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if docstring is None:
            continue
        response = _function_without_docstring(lines, node)
        if response is None:
            skipped["no_body"] += 1
            continue
        if len(docstring) < limits.min_docstring_chars or len(response) < limits.min_response_chars:
            skipped["too_short"] += 1
            continue
        if len(docstring) > limits.max_docstring_chars or len(response) > limits.max_response_chars:
            skipped["too_long"] += 1
            continue
        kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
        signature = f"{node.name}({ast.unparse(node.args)})"
        if node.returns is not None:
            signature += f" -> {ast.unparse(node.returns)}"
        prompt = PROMPT_TEMPLATE.format(kind=kind, signature=signature, docstring=docstring)
        if SPECIAL_TOKEN_TEXT.search(prompt) or SPECIAL_TOKEN_TEXT.search(response):
            skipped["special_token_text"] += 1
            continue
        examples.append(InstructionExample(f"{doc_id}#{node.name}", prompt, response))
    return examples


def split_of(prompt: str, validation_fraction: float) -> str:
    """"train" or "validation", from a hash of the prompt: stable whatever else is in the set."""
    position = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if position < validation_fraction else "train"


def train_documents(data_dir: str | Path) -> Iterator[dict]:
    """The train-split documents of a data_prep run, shard by shard in name order."""
    folder = Path(data_dir) / "documents" / "train"
    shards = sorted(folder.glob(f"*{DOC_SHARD_SUFFIX}"))
    if not shards:
        raise ValueError(f"{folder}: no {DOC_SHARD_SUFFIX} document shards (is --data_dir a data_prep output_dir?)")
    for shard in shards:
        yield from read_docs(shard)


def collect_examples(documents: Iterable[dict] | Iterable[str], limits: ExtractionLimits = ExtractionLimits(),
                     max_examples: int | None = None) -> tuple[list[InstructionExample], Counter]:
    """Unique-prompt examples from documents (data_prep records, or plain source texts), and the counts."""
    counts: Counter = Counter()
    seen_prompts: set[str] = set()
    examples: list[InstructionExample] = []
    for index, document in enumerate(documents):
        if max_examples is not None and len(examples) >= max_examples:
            break
        if isinstance(document, str):
            document = {"id": f"text{index}", "kind": "code", "text": document}
        counts["documents"] += 1
        if document.get("kind", "code") != "code":
            counts["not_code"] += 1
            continue
        try:
            found = examples_from_source(document["text"], document.get("id", f"doc{index}"), limits, counts)
        except (SyntaxError, ValueError, RecursionError):  # ValueError: null bytes; deep nesting: RecursionError
            counts["unparseable"] += 1
            continue
        for example in found:
            if example.prompt in seen_prompts:
                counts["duplicate_prompt"] += 1
                continue
            if max_examples is not None and len(examples) >= max_examples:
                break
            seen_prompts.add(example.prompt)
            examples.append(example)
    counts["examples"] = len(examples)
    return examples, counts


def write_instruction_set(examples: list[InstructionExample], output_dir: str | Path,
                          validation_fraction: float) -> dict[str, int]:
    """Write train.jsonl and validation.jsonl; returns the number of examples in each."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for example in examples:
        splits[split_of(example.prompt, validation_fraction)].append(json.dumps(example.to_record(),
                                                                                ensure_ascii=False))
    output_dir = Path(output_dir)
    for split, records in splits.items():
        atomic_write_text(output_dir / f"{split}.jsonl", "".join(record + "\n" for record in records))
    return {split: len(records) for split, records in splits.items()}


def build_instruction_set(source: str | Path | list[str], output_dir: str | Path, *,
                          validation_fraction: float = 0.05, max_examples: int | None = None,
                          limits: ExtractionLimits = ExtractionLimits()) -> dict:
    """Examples from a data_prep output folder (its train documents) or a list of source texts, written
    to `output_dir` with `report.json`. Returns the report."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples: must be >= 1, got {max_examples}")
    if not 0.0 <= validation_fraction < 1.0:  # checked before the corpus is read
        raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    documents = source if isinstance(source, list) else train_documents(source)
    examples, counts = collect_examples(documents, limits, max_examples)
    sizes = write_instruction_set(examples, output_dir, validation_fraction)
    report = {"source": str(source) if not isinstance(source, list) else f"{len(source)} texts",
              "validation_fraction": validation_fraction, "max_examples": max_examples,
              "counts": dict(sorted(counts.items())), **sizes}
    atomic_write_text(Path(output_dir) / "report.json", json.dumps(report, indent=2) + "\n")
    return report


@dataclass
class InstructionArguments:
    data_dir: str = field(metadata={"help": "output_dir of a data_prep run (documents/train/ is read)"})
    output: str = field(metadata={"help": "folder for train.jsonl, validation.jsonl, report.json"})
    max_examples: int | None = field(default=None, metadata={"help": "stop after this many unique examples"})
    validation_fraction: float = 0.05


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((InstructionArguments,), sys.argv[1:] if argv is None else argv,
                             prog="python -m data_prep.instructions", description=__doc__.split("\n\n")[0],
                             path_keys=("data_dir", "output"), space_values=True)
        report = build_instruction_set(args.data_dir, args.output, validation_fraction=args.validation_fraction,
                                       max_examples=args.max_examples)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    counts = report["counts"]
    print(f"instructions: {report['train']:,} train + {report['validation']:,} validation examples from "
          f"{counts.get('documents', 0):,} documents ({counts.get('unparseable', 0):,} unparseable, "
          f"{counts.get('not_code', 0):,} not code, {counts.get('duplicate_prompt', 0):,} duplicate prompts) "
          f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
