"""Pretrain an Ember model on the packed shards of `python -m data_prep` with the HF Trainer.

    accelerate launch --config_file accelerate_configs/<tier>.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_<recipe>.yaml [--key=value ...]
    python recipes/pretrain.py --config recipes/configs/pretrain_nano_cpu.yaml      # one process

Keys: `ModelArguments`, `DataArguments`, `PretrainingArguments` and `ObjectiveArguments` (training/arguments.py;
`objective: clm | prefix_lm | mlm | ul2`, where mlm trains a bidirectional encoder, `EmberForMaskedLM`), plus every
`transformers.TrainingArguments` field; `--help` lists them. The output folder is a Hub-ready model:
safetensors, config with `auto_map` and the model code, the tokenizer, a generation config and a model card.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainingArguments, set_seed

from training.arguments import (
    PRETRAIN_PATH_KEYS,
    DataArguments,
    ModelArguments,
    ObjectiveArguments,
    PretrainingArguments,
    parse_training_args,
)
from training.plan import plan_run
from training.pretraining import (
    PretrainingSettings,
    PretrainingTrainers,
    build_model,
    check_settings,
    describe_run,
    finish_pretraining,
    load_data,
    prepare_training_args,
)
from training.run import recipe_main, run_from_command_line, train_and_finish
from training.spikes import train_with_rollbacks

SCHEMAS = (ModelArguments, DataArguments, PretrainingArguments, ObjectiveArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> PretrainingSettings:
    """(model, data, run, objective, training) arguments from a YAML and overrides."""
    return PretrainingSettings(*parse_training_args(
        SCHEMAS, argv, config=config, overrides=overrides, path_keys=PRETRAIN_PATH_KEYS, prog="recipes/pretrain.py",
        description=__doc__.split("\n\n")[0]))


@recipe_main
def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    settings = parse(sys.argv[1:] if argv is None and config is None else argv, config=config, overrides=overrides)
    check_settings(settings)
    args = settings.training

    data = load_data(settings)
    set_seed(args.seed)
    model = build_model(settings.model, data.tokenizer, data.seq_len, settings.objective.objective)
    data.tokenizer.model_max_length = model.config.max_position_embeddings  # saved with the model: its context

    plan = plan_run(args, settings.run, data.seq_len, tp_size=settings.model.tp_size,
                    streaming=settings.data.streaming)
    prepare_training_args(settings, plan, model, has_validation=data.validation is not None)
    trainers = PretrainingTrainers(settings, plan, data, model)
    describe_run(settings, plan, data, model)

    # A loss spike rolls back to the last good checkpoint and skips the bad blocks it finds (training/spikes.py).
    return train_and_finish(
        args, "pretrain", train=lambda resume: train_with_rollbacks(trainers, resume, settings.run.max_rollbacks),
        finish=lambda trained: finish_pretraining(*trained, settings, plan))


if __name__ == "__main__":
    run_from_command_line(main)
