"""Sliding-window perplexity and bits per byte of a checkpoint on held-out text.

    python recipes/eval_perplexity.py --model=outputs/ember-125m --data=data/web/documents/validation \\
        [--window=2048 --stride=1024 --batch_size=8 --output=results.json]
    python recipes/eval_perplexity.py --model=outputs/ember-125m --data=data/web/tokens/validation   # packed shards
    python recipes/eval_perplexity.py --model=outputs/ember-125m \\
        --dataset_name=Salesforce/wikitext --dataset_config_name=wikitext-2-raw-v1 --split=test

--data is a .txt file (one document), a .jsonl / .jsonl.zst file (one document per line, --text_field),
a folder of those (data_prep's documents/<split>/), or a data_prep packed token folder (tokens/<split>/).
The model folder is an Ember checkpoint or a stock one (e.g. Llama after `python -m modeling.convert to-hf`);
its tokenizer is read from the same folder unless --tokenizer says otherwise. Window and stride semantics:
`evaluation/perplexity.py`. bits_per_byte does not depend on the tokenizer, so it compares models that
tokenize differently; perplexity does not.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cli import ConfigError, parse_args, report_error
from data_prep.documents import read_hub_documents
from evaluation.perplexity import PerplexityResult, evaluate_path, evaluate_perplexity
from modeling.loading import load_checkpoint, torch_dtype
from training.run import keep_freed_memory


@dataclass
class PerplexityArguments:
    model: str = field(metadata={"help": "checkpoint folder (Ember or stock transformers)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    data: str | None = field(default=None, metadata={
        "help": "text/jsonl/jsonl.zst file, documents folder or packed token folder"})
    dataset_name: str | None = field(default=None, metadata={"help": "a Hugging Face Hub dataset instead of data"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration"})
    split: str = field(default="test", metadata={"help": "Hub dataset split"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in jsonl / Hub rows"})
    window: int | None = field(default=None, metadata={"help": "model inputs per window (default: context length)"})
    stride: int | None = field(default=None, metadata={"help": "targets scored per window after the first "
                                                                 "(default: window / 2)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    max_documents: int | None = field(default=None, metadata={"help": "score only the first N documents"})
    concatenate: bool = field(default=False, metadata={
        "help": "score the documents as one EOS-separated stream instead of one by one"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16, float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "for checkpoints whose code is not here"})
    output: str | None = field(default=None, metadata={
        "help": "where the results go as JSON (default: perplexity_<data name>.json in the model folder)"})


PATH_KEYS = ("model", "tokenizer", "data", "output")


def format_table(result: PerplexityResult) -> str:
    def number(value: float | None, digits: int = 4) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"

    documents = f"{result.num_documents:,}"
    if result.skipped_documents:
        documents += f" ({result.skipped_documents:,} empty, skipped)"
    rows = [
        ("mode", result.mode),
        ("documents", documents),
        ("tokens", f"{result.num_tokens:,}"),
        ("bytes", "n/a" if result.num_bytes is None else f"{result.num_bytes:,}"),
        ("window / stride", f"{result.window} / {result.stride}"),
        ("nll / token", number(result.mean_nll)),
        ("perplexity", number(result.perplexity, 3)),
        ("bits / byte", number(result.bits_per_byte)),
    ]
    if result.note:
        rows.append(("note", result.note))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((PerplexityArguments,), sys.argv[1:] if argv is None else argv,
                             prog="recipes/eval_perplexity.py", description=__doc__.split("\n\n")[0],
                             path_keys=PATH_KEYS, space_values=True)
        if (args.data is None) == (args.dataset_name is None):
            raise ConfigError("data: give exactly one of data (local documents or shards) and dataset_name (Hub)")
        if args.data is not None and not Path(args.data).exists():  # before loading a large model
            raise ValueError(f"{args.data}: no such file or folder")
        torch_dtype(args.dtype)
        keep_freed_memory()  # each batch's logits reuse the last one's memory instead of faulting in new pages
        options = dict(window=args.window, stride=args.stride, batch_size=args.batch_size,
                       max_documents=args.max_documents, concatenate=args.concatenate)
        model, tokenizer = load_checkpoint(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code)
        if args.data is not None:
            result = evaluate_path(model, tokenizer, args.data, text_field=args.text_field, **options)
        else:
            texts = read_hub_documents(args.dataset_name, args.dataset_config_name, args.split, args.text_field)
            result = evaluate_perplexity(model, tokenizer, texts, **options)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    print(format_table(result))
    data = args.data or f"{args.dataset_name}:{args.dataset_config_name or ''}[{args.split}]"
    output = Path(args.output) if args.output else Path(args.model) / f"perplexity_{_slug(data)}.json"
    result.write_json(output, model=args.model, data=data)
    print(f"wrote {output}")
    return 0


def _slug(data: str) -> str:
    """A file-name part for the data scored: its last path parts (`documents_validation`) or the dataset name."""
    parts = [part for part in Path(data.split(":")[0]).parts[-2:] if part not in ("/", "..", ".")]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_") or "data"


if __name__ == "__main__":
    sys.exit(main())
