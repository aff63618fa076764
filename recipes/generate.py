"""Generate text from a trained model, streaming it to the terminal as it is produced.

    python recipes/generate.py --model=runs/nano-cpu --prompt="def parse_args(" --max_new_tokens=64
    python recipes/generate.py --model=runs/nano-cpu --temperature=0 < prompt.txt          # greedy, prompt on stdin
    python recipes/generate.py --model=runs/sft-lora --chat --prompt="What does os.path.join do?"

`--model` is any folder `modeling.loading` reads: an Ember checkpoint, a stock Llama / Mistral export of
`python -m modeling.convert to-hf`, a merged LoRA model, or a peft adapter folder. `--chat` wraps the prompt
in the tokenizer's chat template and stops at the end of the answer. Samples use seeds `seed`, `seed + 1`,
...; the same seed gives the same text. Bad input (missing folder, empty prompt file, out-of-range setting)
is a one-line `error:` and exit 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import TextStreamer

from cli import ConfigError, parse_args, report_error
from evaluation.generation import check_generation_settings, generate, load_for_generation


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "checkpoint or peft adapter folder"})
    prompt: str | None = field(default=None, metadata={"help": "prompt text (default: read from stdin)"})
    prompt_file: str | None = field(default=None, metadata={"help": "file whose whole text is the prompt"})
    chat: bool = field(default=False, metadata={"help": "render the prompt with the chat template"})
    max_new_tokens: int = 128
    temperature: float = field(default=0.8, metadata={"help": "0 decodes greedily"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass; 1 disables"})
    top_k: int = field(default=50, metadata={"help": "keep the k likeliest tokens; 0 disables"})
    seed: int = field(default=0, metadata={"help": "seed of the first sample"})
    num_samples: int = 1
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's), float32, bfloat16 or float16"})
    no_stream: bool = field(default=False, metadata={"help": "print each sample once it is complete"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the code files of a checkpoint of an architecture transformers does not know"})


PATH_KEYS = ("model", "prompt_file")


def read_prompt(args: GenerateArguments) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("prompt_file: give either prompt or prompt_file, not both")
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((GenerateArguments,), sys.argv[1:] if argv is None else argv,
                             prog="recipes/generate.py", description=__doc__.split("\n\n")[0],
                             path_keys=PATH_KEYS, space_values=True)
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
    except (ConfigError, ValueError) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    sys.exit(main())
