"""Generate text from a trained model, streaming it to the terminal as it is produced.

    python recipes/generate.py --model runs/nano-cpu --prompt "def parse_args(" --max_new_tokens 64
    python recipes/generate.py --model runs/nano-cpu --temperature 0 < prompt.txt          # greedy, prompt on stdin
    python recipes/generate.py --model runs/sft-lora --chat --prompt "What does os.path.join do?"

`--model` is any folder `modeling.generation.load_for_generation` reads: an Ember checkpoint, a
stock Llama / Mistral export of `python -m modeling.convert to-hf`, a merged LoRA model, or a peft
adapter folder. `--chat` wraps the prompt in the tokenizer's chat template and stops at the end of
the answer. Samples use seeds `--seed`, `--seed + 1`, ...; the same seed gives the same text.
Bad input (missing folder, empty prompt file, out-of-range setting) is a one-line `error:` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from transformers import TextStreamer

from modeling.generation import check_generation_settings, generate, load_for_generation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipes/generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint or peft adapter folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text (default: read from stdin)")
    source.add_argument("--prompt_file", help="file whose whole text is the prompt")
    parser.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass; 1 disables")
    parser.add_argument("--top_k", type=int, default=50, help="keep the k likeliest tokens; 0 disables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    parser.add_argument("--no_stream", action="store_true", help="print each sample once it is complete")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the code files of a checkpoint of an architecture transformers does not know")
    return parser


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"{path}: no such prompt file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt, --prompt_file, or pipe the prompt on stdin")
    return sys.stdin.read()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {args.num_samples}")
        check_generation_settings(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
        prompt = read_prompt(args)
        model, tokenizer = load_for_generation(args.model, device=args.device, dtype=args.dtype,
                                               trust_remote_code=args.trust_remote_code)
        for index in range(args.num_samples):
            seed = args.seed + index
            if args.num_samples > 1:
                print(f"=== sample {index + 1}/{args.num_samples} (seed {seed}) ===", flush=True)
            # TextStreamer ends each sample with a newline; without streaming the print adds it.
            streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            text = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=seed,
                            chat=args.chat, streamer=streamer)
            if streamer is None:
                print(text, flush=True)
    except ValueError as err:
        message = " ".join(str(err).split())  # keep it on one line
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    sys.exit(main())
