"""Average the weights of several checkpoints into one loadable model folder.

    python -m training.average outputs/run/checkpoint-800 outputs/run/checkpoint-900 outputs/run/checkpoint-1000 \\
        --output=outputs/run/averaged

Each checkpoint is a model folder (a `checkpoint-N` of a run, or any saved Ember or stock model) with the same
parameters; the output holds their element-wise mean (`average_checkpoints`), the config and model code, and
the first checkpoint's tokenizer and generation config. Tied weights stay tied. Polyak averaging of the last K
checkpoints; with a WSD schedule, averaging checkpoints of the stable phase approximates the decay (Hägele et
al. 2024). The average kept while training is `training/ema.py`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cli import ConfigError, honour_umask, parse_args, report_error
from modeling.loading import checkpoint_tokenizer, load_model


@torch.no_grad()
def average_checkpoints(paths: Sequence[str | Path]) -> PreTrainedModel:
    """The first checkpoint's model holding the mean of all the checkpoints' weights (float32 mean, stored in
    the first model's dtype). Every checkpoint must have the same parameters and shapes. Tied weights are one
    parameter in the model and are averaged once; integer buffers are taken from the first checkpoint."""
    if not paths:
        raise ValueError("checkpoints: give at least one checkpoint folder")
    model = load_model(paths[0])
    names = {name: p for name, p in model.named_parameters()}
    total = {name: p.detach().float().clone() for name, p in names.items()}
    for path in paths[1:]:
        other = dict(load_model(path).named_parameters())
        if other.keys() != names.keys():
            raise ValueError(f"{path}: has other parameters than {paths[0]} "
                             f"({sorted(other.keys() ^ names.keys())[0]})")
        for name, p in other.items():
            if p.shape != total[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(p.shape)}, {paths[0]} {tuple(total[name].shape)}")
            total[name] += p.detach().float()
    for name, p in names.items():
        p.copy_((total[name] / len(paths)).to(p.dtype))
    return model


@dataclass
class AverageArguments:
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "the checkpoint folders to average (positional arguments)"})
    output: str = field(default="", metadata={"help": "the folder to write the averaged model to"})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        (args,) = parse_args((AverageArguments,), sys.argv[1:] if argv is None else argv,
                             prog="python -m training.average", description=__doc__.split("\n\n")[0],
                             positionals=("checkpoints",), path_keys=("checkpoints", "checkpoints.*", "output"))
        if len(args.checkpoints) < 2:
            raise ConfigError("checkpoints: give two or more checkpoint folders to average")
        if not args.output:
            raise ConfigError("output: required (the folder to write the averaged model to)")
        for path in args.checkpoints:
            if not Path(path).is_dir():
                raise ConfigError(f"checkpoints: {path}: no such folder")
        model = average_checkpoints(args.checkpoints)
        model.save_pretrained(args.output)
        with contextlib.suppress(ValueError):  # a model without a tokenizer of its own has none to copy
            checkpoint_tokenizer(args.checkpoints[0]).save_pretrained(args.output)
        honour_umask(args.output)  # safetensors writes its files 0600
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    print(f"averaged {len(args.checkpoints)} checkpoints into {args.output}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
