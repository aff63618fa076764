"""Labelled jsonl data for finetuning a classifier on an Ember trunk.

- Sequence classification: one `{"text", "label"}` record per line. The text is encoded without special
  tokens, cut to `max_length - 1` tokens and closed with EOS: the token `EmberForSequenceClassification`
  pools in a decoder (`classifier_pooling: last`; there it has read the whole text). An encoder pools the
  mean over the text instead.
- Token classification: one `{"tokens", "tags"}` record per line (CoNLL style: words and their BIO tags).
  The words are joined with spaces and encoded once; each word's first sub-token carries its tag, the
  other sub-tokens -100, and predictions are read back from the first sub-tokens.

Labels are strings; their ids follow `labels` (default: the sorted labels of the training file). A record
with a label outside that set, a missing field or a tag count that does not match the words is a
one-line `ValueError` naming `file:line` and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from cli import ConfigError
from modeling import IGNORE_INDEX, EmberConfig
from modeling.loading import load_model
from training.arguments import ClassifierArguments
from training.checkpoints import ReadableSavesMixin


def read_records(path: str | Path, fields: tuple[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for each non-blank line of a jsonl file whose records have both `fields`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for name in fields:
                if name not in record:
                    raise ValueError(f"{where}: {name}: missing (keys: {sorted(record)})")
            records.append((where, record))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def labels_of(records: list[tuple[str, dict]], field: str, token_level: bool) -> list[str]:
    """The sorted set of labels (or tags) the records use."""
    found = set()
    for _, record in records:
        values = record[field] if token_level else [record[field]]
        found.update(str(value) for value in values)
    return sorted(found)


def _label_id(value: Any, label2id: dict[str, int], where: str, field: str) -> int:
    if str(value) not in label2id:
        raise ValueError(f"{where}: {field}: {value!r} is not one of the labels {sorted(label2id)}")
    return label2id[str(value)]


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[tuple[str, dict]], tokenizer, label2id: dict[str, int], max_length: int,
                 text_field: str = "text", label_field: str = "label"):
        if max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {max_length}")
        self.examples = []
        for where, record in records:
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: {text_field}: must be a string, got {type(text).__name__}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
            self.examples.append({"input_ids": ids, "labels": _label_id(record[label_field], label2id, where,
                                                                         label_field)})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def align_words(tokenizer, words: list[str], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, index of the first token of each word, -1 for words cut off by `max_length`)."""
    text = " ".join(words)
    char_to_word = []
    for index, word in enumerate(words):
        char_to_word += [index] * len(word) + [-1]  # -1: the joining space
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"][:max_length]
    first = [-1] * len(words)
    for position, (start, end) in enumerate(encoding["offset_mapping"][:max_length]):
        inside = [char_to_word[c] for c in range(start, end) if char_to_word[c] >= 0]
        if inside and first[inside[0]] == -1:
            first[inside[0]] = position
    return ids, first


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[tuple[str, dict]], tokenizer, label2id: dict[str, int], max_length: int,
                 tokens_field: str = "tokens", tags_field: str = "tags"):
        self.examples, self.first_tokens, self.tags = [], [], []
        for where, record in records:
            words, tags = record[tokens_field], record[tags_field]
            if not isinstance(words, list) or not all(isinstance(w, str) and w and not w.isspace() for w in words):
                raise ValueError(f"{where}: {tokens_field}: must be a list of non-blank strings")
            if not isinstance(tags, list) or len(tags) != len(words):
                raise ValueError(f"{where}: {tags_field}: {len(tags) if isinstance(tags, list) else 'no list of'} "
                                 f"tags for {len(words)} tokens")
            ids, first = align_words(tokenizer, words, max_length)
            labels = [IGNORE_INDEX] * len(ids)
            for position, tag in zip(first, tags):
                tag_id = _label_id(tag, label2id, where, tags_field)
                if position >= 0:
                    labels[position] = tag_id
            self.examples.append({"input_ids": ids, "labels": labels})
            self.first_tokens.append(first)
            self.tags.append([str(tag) for tag in tags])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    def word_predictions(self, index: int, token_predictions, id2label: dict[int, str]) -> list[str]:
        """One tag per word from a row of per-token predicted ids; words cut off by max_length get "O"."""
        return [id2label[int(token_predictions[p])] if p >= 0 else "O" for p in self.first_tokens[index]]


def load_classification_data(args: ClassifierArguments, tokenizer):
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


class ClassifierTrainer(ReadableSavesMixin, Trainer):
    """The HF Trainer; its saved model folders honour the umask (`ReadableSavesMixin`)."""


__all__ = ["ClassifierTrainer", "SequenceDataset", "TokenDataset", "align_words", "build_classifier", "checkpoint_path",
           "labels_of", "load_classification_data", "read_records"]
