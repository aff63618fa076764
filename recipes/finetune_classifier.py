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
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from cli import ConfigError, report_error
from evaluation.classification import accuracy, entity_scores, macro_f1
from modeling import EmberConfig
from modeling.loading import checkpoint_tokenizer, load_model
from modeling.tokenizer_config import make_portable
from training.arguments import CLASSIFIER_PATH_KEYS, ClassifierArguments, parse_training_args
from training.callbacks import use_log_lines
from training.checkpoints import as_launched_rank, exit_rank, resolve_resume
from training.classification import ClassifierTrainer, SequenceDataset, TokenDataset, labels_of, read_records
from training.interrupt import StopOnInterrupt, locked_run, stop_quietly

SCHEMAS = (ClassifierArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple:
    """(ClassifierArguments, TrainingArguments) from a YAML and overrides."""
    return parse_training_args(SCHEMAS, argv, config=config, overrides=overrides, path_keys=CLASSIFIER_PATH_KEYS,
                               prog="recipes/finetune_classifier.py", description=__doc__.split("\n\n")[0])


def load_data(args: ClassifierArguments, tokenizer):
    """(train, validation, labels) with every problem a one-line ValueError naming file:line and field."""
    for name in ("train_file", "validation_file"):
        if not getattr(args, name):
            raise ConfigError(f"{name}: required (python -m data_prep.tasks writes the stdlib tasks)")
    token_level = args.task == "token"
    fields = (args.tokens_field, args.tags_field) if token_level else (args.text_field, args.label_field)
    train_records = read_records(args.train_file, fields)
    labels = list(args.labels) if args.labels else labels_of(train_records, fields[1], token_level)
    if token_level and "O" not in labels:
        raise ConfigError("labels: a BIO tag set needs the tag 'O'")
    label2id = {label: i for i, label in enumerate(labels)}
    dataset = TokenDataset if token_level else SequenceDataset
    train = dataset(train_records, tokenizer, label2id, args.max_length, *fields)
    validation = dataset(read_records(args.validation_file, fields), tokenizer, label2id, args.max_length, *fields)
    return train, validation, labels


def checkpoint_path(args: ClassifierArguments) -> Path:
    path = Path(args.model_name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model_name_or_path: not a checkpoint folder: {args.model_name_or_path!r}; pretrain one "
                          "with python recipes/pretrain.py --config recipes/configs/pretrain_encoder_nano_cpu.yaml")
    return path


def build_classifier(args: ClassifierArguments, tokenizer, labels: list[str]):
    """The checkpoint's trunk under a new sequence or token classification head (`modeling.loading`); with
    `from_scratch`, the same architecture freshly initialised."""
    model = load_model(checkpoint_path(args), head="token_classification" if args.task == "token"
                       else "sequence_classification", weights=not args.from_scratch,
                       attn_implementation=args.attn_implementation, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                       pad_token_id=tokenizer.pad_token_id,
                       **({"classifier_pooling": args.classifier_pooling} if args.classifier_pooling else {}))
    if not isinstance(model.config, EmberConfig):
        raise ConfigError(f"model_name_or_path: {args.model_name_or_path} holds a {model.config.model_type!r} "
                          "model, not an Ember one")
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"tokenizer_path: {len(tokenizer)} tokens do not fit the model's {model.config.vocab_size}")
    if args.max_length > model.config.max_position_embeddings:
        raise ConfigError(f"max_length: {args.max_length} exceeds the model's max_position_embeddings "
                          f"{model.config.max_position_embeddings}")
    model.config.use_cache = False
    return model


def sequence_scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict[str, float]:
    return {"accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted, labels)}


def token_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    scores = entity_scores(gold, predicted)
    return {"entity_f1": scores["f1"], "entity_precision": scores["precision"], "entity_recall": scores["recall"],
            **{f"{kind}_f1": value["f1"] for kind, value in scores["per_type"].items()}}


def baseline(validation, labels: list[str], task: str) -> dict[str, float]:
    """The majority baseline: the validation set's most frequent label for every text (the best constant
    guess, whatever the training set's balance), "O" for every word."""
    if task == "token":
        return token_scores(validation.tags, [["O"] * len(tags) for tags in validation.tags])
    gold = [labels[example["labels"]] for example in validation.examples]
    majority = Counter(gold).most_common(1)[0][0]
    return {"label": majority, **sequence_scores(gold, [majority] * len(gold), labels)}


def metrics_function(validation, labels: list[str], task: str):
    """`compute_metrics` for the Trainer, on the validation set in order."""
    id2label = dict(enumerate(labels))

    def compute(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.asarray(logits).argmax(-1)
        if task == "token":
            words = [validation.word_predictions(i, row, id2label) for i, row in enumerate(predicted)]
            return token_scores(validation.tags, words)
        gold = [labels[example["labels"]] for example in validation.examples]
        return sequence_scores(gold, [labels[int(p)] for p in predicted], labels)

    return compute


def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    as_launched_rank()
    try:
        args, training = parse(sys.argv[1:] if argv is None and config is None else argv, config=config,
                               overrides=overrides)
        set_seed(training.seed)
        checkpoint_path(args)
        tokenizer = checkpoint_tokenizer(args.tokenizer_path or args.model_name_or_path)
        train, validation, labels = load_data(args, tokenizer)
        model = build_classifier(args, tokenizer, labels)
        if args.lora:
            from training.finetune import add_lora, lora_config  # peft: slow to import, only for LoRA

            lora = lora_config(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
            lora.task_type = "TOKEN_CLS" if args.task == "token" else "SEQ_CLS"
            lora.modules_to_save = ["score"]
            model = add_lora(model, lora)
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)

    training.remove_unused_columns = False
    training.label_names = ["labels"]
    collator = (DataCollatorForTokenClassification(tokenizer) if args.task == "token"
                else DataCollatorWithPadding(tokenizer))
    trainer = ClassifierTrainer(model=model, args=training, train_dataset=train, eval_dataset=validation,
                                data_collator=collator, processing_class=tokenizer,
                                compute_metrics=metrics_function(validation, labels, args.task))
    use_log_lines(trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        print(f"[classifier] {args.task} task, {len(labels)} labels | {len(train):,} train / {len(validation):,} "
              f"validation examples | {'LoRA r=' + str(args.lora_r) if args.lora else 'full'}: "
              f"{trainable:,} trainable parameters | {training.max_steps} steps", flush=True)
    trainer.add_callback(StopOnInterrupt())  # Ctrl-C: finish the step, save it, stop
    return locked_run(  # saving belongs to the run too
        training.output_dir, main_process=training.process_index == 0,
        resumes_itself=training.resume_from_checkpoint == "auto",
        train=lambda: trainer.train(resume_from_checkpoint=resolve_resume(training.resume_from_checkpoint,
                                                                          training.output_dir)),
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
    torch.set_float32_matmul_precision("high")
    transformers.logging.set_verbosity_warning()
    exit_rank(stop_quietly(main))
