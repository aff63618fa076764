"""Sliding-window perplexity and bits per byte of a checkpoint on held-out text.

    python recipes/eval_perplexity.py --model outputs/ember-125m --data data/web/documents/validation \\
        [--window 2048 --stride 1024 --batch_size 8 --output results.json]
    python recipes/eval_perplexity.py --model outputs/ember-125m --data data/web/tokens/validation   # packed shards
    python recipes/eval_perplexity.py --model outputs/ember-125m \\
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 --split test

--data is a .txt file (one document), a .jsonl / .jsonl.zst file (one document per line, --text_field),
a folder of those (data_prep's documents/<split>/), or a data_prep packed token folder (tokens/<split>/).
The model folder is an Ember checkpoint or a stock one (e.g. Llama after `python -m modeling.convert to-hf`);
its tokenizer is read from the same folder unless --tokenizer says otherwise. Window and stride semantics:
`modeling/evaluation.py`. bits_per_byte does not depend on the tokenizer, so it compares models that
tokenize differently; perplexity does not.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from modeling.evaluation import (
    DTYPES,
    PerplexityResult,
    evaluate_path,
    evaluate_perplexity,
    load_model_and_tokenizer,
    read_hub_texts,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (Ember or stock transformers)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="text/jsonl/jsonl.zst file, documents folder or packed token folder")
    source.add_argument("--dataset_name", help="Hugging Face Hub dataset instead of --data")
    parser.add_argument("--dataset_config_name", help="Hub dataset configuration")
    parser.add_argument("--split", default="test", help="Hub dataset split (default: test)")
    parser.add_argument("--text_field", default="text", help="field holding the text in jsonl / Hub rows")
    parser.add_argument("--window", type=int, help="model inputs per window (default: max_position_embeddings)")
    parser.add_argument("--stride", type=int, help="targets scored per window after the first (default: window/2)")
    parser.add_argument("--batch_size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--max_documents", type=int, help="score only the first N documents")
    parser.add_argument("--concatenate", action="store_true",
                        help="score the documents as one EOS-separated stream instead of one by one")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (default: auto)")
    parser.add_argument("--trust_remote_code", action="store_true", help="for checkpoints whose code is not here")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(window=args.window, stride=args.stride, batch_size=args.batch_size,
                   max_documents=args.max_documents, concatenate=args.concatenate)
    try:
        if args.data is not None and not Path(args.data).exists():  # before loading a large model
            raise ValueError(f"{args.data}: no such file or folder")
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                                    trust_remote_code=args.trust_remote_code)
        if args.data is not None:
            result = evaluate_path(model, tokenizer, args.data, text_field=args.text_field, **options)
        else:
            texts = read_hub_texts(args.dataset_name, args.dataset_config_name, args.split, args.text_field)
            result = evaluate_perplexity(model, tokenizer, texts, **options)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.output:
        data = args.data or f"{args.dataset_name}:{args.dataset_config_name or ''}[{args.split}]"
        result.write_json(args.output, model=args.model, data=data)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
