"""Finetune an Ember checkpoint (encoder or decoder) as a sequence or token classifier, fully or with LoRA.

    python -m data_prep.tasks --output outputs/tasks/stdlib        # the stdlib "package" and "calls" tasks
    python recipes/finetune_classifier.py --config recipes/configs/classify_package_nano_cpu.yaml [--key=value ...]
    python recipes/finetune_classifier.py --config recipes/configs/tag_calls_nano_cpu.yaml

Keys: `ClassifierArguments` (training/arguments.py) plus every `transformers.TrainingArguments` field; `--help`
lists them. `task: sequence` reads
`{"text", "label"}` records and reports accuracy and macro-F1; `task: token` reads `{"tokens", "tags"}`
(BIO tags) and reports entity-level precision / recall / F1 (CoNLL's definition). Both report the
majority baseline on the same validation data: its most frequent label for every text, or "O" for every
token (entity F1 0). `output_dir` gets the classifier (with LoRA: merged into the trunk), a
plain checkpoint loading with `AutoModelForSequenceClassification` / `AutoModelForTokenClassification`
(`trust_remote_code=True`), the tokenizer and `classifier_results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from evaluation.classification import baseline, metrics_function
from modeling.loading import checkpoint_tokenizer
from modeling.tokenizer_config import make_portable
from training.arguments import CLASSIFIER_PATH_KEYS, ClassifierArguments, parse_training_args
from training.callbacks import use_log_lines
from training.classification import ClassifierTrainer, build_classifier, checkpoint_path, load_classification_data
from training.interrupt import StopOnInterrupt
from training.run import recipe_main, run_from_command_line, train_and_finish

SCHEMAS = (ClassifierArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple:
    """(ClassifierArguments, TrainingArguments) from a YAML and overrides."""
    return parse_training_args(SCHEMAS, argv, config=config, overrides=overrides, path_keys=CLASSIFIER_PATH_KEYS,
                               prog="recipes/finetune_classifier.py", description=__doc__.split("\n\n")[0])


@recipe_main
def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    args, training = parse(sys.argv[1:] if argv is None and config is None else argv, config=config,
                           overrides=overrides)
    set_seed(training.seed)
    checkpoint_path(args)
    tokenizer = checkpoint_tokenizer(args.tokenizer_path or args.model_name_or_path)
    train, validation, labels = load_classification_data(args, tokenizer)
    model = build_classifier(args, tokenizer, labels)
    if args.lora:
        from training.finetune import add_lora, lora_config  # peft: slow to import, only for LoRA

        lora = lora_config(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        lora.task_type = "TOKEN_CLS" if args.task == "token" else "SEQ_CLS"
        lora.modules_to_save = ["score"]
        model = add_lora(model, lora)

    training.remove_unused_columns = False
    training.label_names = ["labels"]
    collator = (DataCollatorForTokenClassification(tokenizer) if args.task == "token"
                else DataCollatorWithPadding(tokenizer))
    trainer = ClassifierTrainer(model=model, args=training, train_dataset=train, eval_dataset=validation,
                                data_collator=collator, processing_class=tokenizer,
                                compute_metrics=metrics_function(validation, labels, args.task))
    use_log_lines(trainer)
    trainer.add_callback(StopOnInterrupt())  # Ctrl-C: finish the step, save it, stop
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        print(f"[classifier] {args.task} task, {len(labels)} labels | {len(train):,} train / {len(validation):,} "
              f"validation examples | {'LoRA r=' + str(args.lora_r) if args.lora else 'full'}: "
              f"{trainable:,} trainable parameters | {training.max_steps} steps", flush=True)
    return train_and_finish(  # saving belongs to the run too
        training, "classifier", train=lambda resume: trainer.train(resume_from_checkpoint=resume),
        finish=lambda result: _finish(trainer, result, args, validation, labels, len(train)))


def _finish(trainer: Trainer, result, args: ClassifierArguments, validation, labels: list[str],
            train_examples: int) -> int:
    """After training: the validation scores against the majority baseline, the classifier, classifier_results.json."""
    training = trainer.args
    scores = trainer.evaluate()
    if args.lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(training.output_dir)
    if trainer.is_world_process_zero():
        make_portable(training.output_dir)  # the tokenizer loads in transformers 4.x too
        majority = baseline(validation, labels, args.task)
        key = "entity_f1" if args.task == "token" else "accuracy"
        results = {
            "task": args.task, "labels": labels, "train_examples": train_examples,
            "validation_examples": len(validation),
            "validation": {k.removeprefix("eval_"): v for k, v in scores.items()},
            "majority_baseline": majority, "margin_over_baseline": scores[f"eval_{key}"] - majority[key],
            "train": result.metrics,
            "config": {**dataclasses.asdict(args), "learning_rate": training.learning_rate,
                       "max_steps": training.max_steps, "seed": training.seed},
        }
        Path(training.output_dir, "classifier_results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[classifier] validation {key} {scores[f'eval_{key}']:.4f} vs majority baseline {majority[key]:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    run_from_command_line(main)
