"""Finetune an Ember checkpoint (encoder or decoder) as a sequence or token classifier, fully or with LoRA.

    python -m data_prep.tasks --output outputs/tasks/stdlib        # the stdlib "package" and "calls" tasks
    python recipes/finetune_classifier.py --config recipes/configs/classify_package_nano_cpu.yaml [--key=value ...]
    python recipes/finetune_classifier.py --config recipes/configs/tag_calls_nano_cpu.yaml

Keys: `ClassifierArguments` below plus every `transformers.TrainingArguments` field. `task: sequence` reads
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import modeling  # noqa: F401  (registers Ember with the Auto classes)
from data_prep.tokenizer import load_tokenizer
from evaluation.classification import accuracy, entity_scores, macro_f1
from modeling.finetune import add_lora, lora_config, parameter_counts
from modeling.recipe_config import RecipeConfigError, parse_recipe_args
from training.classification import SequenceDataset, TokenDataset, labels_of, read_records

TASKS = ("sequence", "token")


@dataclass
class ClassifierArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Ember checkpoint folder (its tokenizer too)"})
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer folder; default: model_name_or_path"})
    from_scratch: bool = field(default=False, metadata={"help": "random trunk of the checkpoint's shape (baseline)"})
    task: str = field(default="sequence", metadata={"help": "sequence | token"})
    train_file: str = ""
    validation_file: str = ""
    labels: list[str] | None = field(default=None, metadata={"help": "the label set; default: the train file's"})
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    max_length: int = field(default=256, metadata={"help": "tokens per example; longer ones are cut"})
    lora: bool = field(default=False, metadata={"help": "LoRA on the trunk's projections; the head trains fully"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    attn_implementation: str = "sdpa"


PATH_KEYS = ("model_name_or_path", "tokenizer_path", "train_file", "validation_file", "output_dir")


def load_data(args: ClassifierArguments, tokenizer):
    """(train, validation, labels) with every problem a one-line ValueError naming file:line and field."""
    if args.task not in TASKS:
        raise RecipeConfigError(f"task: expected one of {TASKS}, got {args.task!r}")
    for name in ("train_file", "validation_file"):
        if not getattr(args, name):
            raise RecipeConfigError(f"{name}: required (python -m data_prep.tasks writes the stdlib tasks)")
    token_level = args.task == "token"
    fields = (args.tokens_field, args.tags_field) if token_level else (args.text_field, args.label_field)
    train_records = read_records(args.train_file, fields)
    labels = list(args.labels) if args.labels else labels_of(train_records, fields[1], token_level)
    if token_level and "O" not in labels:
        raise RecipeConfigError("labels: a BIO tag set needs the tag 'O'")
    label2id = {label: i for i, label in enumerate(labels)}
    dataset = TokenDataset if token_level else SequenceDataset
    train = dataset(train_records, tokenizer, label2id, args.max_length, *fields)
    validation = dataset(read_records(args.validation_file, fields), tokenizer, label2id, args.max_length, *fields)
    return train, validation, labels


def checkpoint_path(args: ClassifierArguments) -> Path:
    path = Path(args.model_name_or_path)
    if not (path / "config.json").is_file():
        raise RecipeConfigError(f"model_name_or_path: not a checkpoint folder: {args.model_name_or_path!r}")
    return path


def load_model(args: ClassifierArguments, tokenizer, labels: list[str]):
    path = checkpoint_path(args)
    head = AutoModelForTokenClassification if args.task == "token" else AutoModelForSequenceClassification
    settings = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.from_pretrained(path, **settings)
    if config.model_type != "ember":
        raise RecipeConfigError(f"model_name_or_path: {path} holds a {config.model_type!r} model, not an Ember one")
    if config.vocab_size < len(tokenizer):
        raise RecipeConfigError(f"tokenizer_path: {len(tokenizer)} tokens do not fit the model's {config.vocab_size}")
    if args.max_length > config.max_position_embeddings:
        raise RecipeConfigError(f"max_length: {args.max_length} exceeds the model's max_position_embeddings "
                                f"{config.max_position_embeddings}")
    config.use_cache = False
    if args.from_scratch:
        return head.from_config(config, attn_implementation=args.attn_implementation)
    return head.from_pretrained(path, config=config, attn_implementation=args.attn_implementation)


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


def main(argv: list[str] | None = None) -> int:
    try:
        args, training = parse_recipe_args((ClassifierArguments, TrainingArguments),
                                           sys.argv[1:] if argv is None else argv, PATH_KEYS)
        set_seed(training.seed)
        checkpoint_path(args)
        tokenizer = load_tokenizer(args.tokenizer_path or args.model_name_or_path)
        train, validation, labels = load_data(args, tokenizer)
        model = load_model(args, tokenizer, labels)
        if args.lora:
            lora = lora_config(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
            lora.task_type = "TOKEN_CLS" if args.task == "token" else "SEQ_CLS"
            lora.modules_to_save = ["score"]
            model = add_lora(model, lora)
    except (RecipeConfigError, ValueError, OSError) as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2

    training.remove_unused_columns = False
    training.label_names = ["labels"]
    collator = (DataCollatorForTokenClassification(tokenizer) if args.task == "token"
                else DataCollatorWithPadding(tokenizer))
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=validation,
                      data_collator=collator, processing_class=tokenizer,
                      compute_metrics=metrics_function(validation, labels, args.task))
    counts = parameter_counts(model) if args.lora else {"trainable": sum(p.numel() for p in model.parameters())}
    if trainer.is_world_process_zero():
        print(f"[classifier] {args.task} task, {len(labels)} labels | {len(train):,} train / {len(validation):,} "
              f"validation examples | {'LoRA r=' + str(args.lora_r) if args.lora else 'full'}: "
              f"{counts['trainable']:,} trainable parameters | {training.max_steps} steps")
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    scores = trainer.evaluate()
    if args.lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(training.output_dir)

    if trainer.is_world_process_zero():
        majority = baseline(validation, labels, args.task)
        key = "entity_f1" if args.task == "token" else "accuracy"
        results = {
            "task": args.task, "labels": labels, "train_examples": len(train), "validation_examples": len(validation),
            "validation": {k.removeprefix("eval_"): v for k, v in scores.items()},
            "majority_baseline": majority, "margin_over_baseline": scores[f"eval_{key}"] - majority[key],
            "train": result.metrics,
            "config": {**dataclasses.asdict(args), "learning_rate": training.learning_rate,
                       "max_steps": training.max_steps, "seed": training.seed},
        }
        Path(training.output_dir, "classifier_results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[classifier] validation {key} {scores[f'eval_{key}']:.4f} vs majority baseline {majority[key]:.4f}")
    return 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    transformers.logging.set_verbosity_warning()
    sys.exit(main())
