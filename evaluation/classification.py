"""Scores of classifiers: accuracy and macro-F1 for labels, entity-level F1 for BIO-tagged sequences, the
majority baseline, and the Trainer's `compute_metrics` for a validation set (`metrics_function`).

Entity-level F1 follows CoNLL-2003's conlleval: an entity is a maximal run of one type that starts at a
B- tag, or at an I- tag that does not continue an entity of its type; a predicted entity counts only when
its type and both boundaries match a gold one. Precision, recall and F1 are micro-averaged over entities
(the CoNLL number), with per-type scores next to them. (`evaluate`'s "seqeval" metric computes the same
but loads its script from the Hub, which an offline machine cannot.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"predictions: need as many as the {len(gold)} gold labels, got {len(predicted)}")
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def _f1(true_positive: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def macro_f1(gold: Sequence, predicted: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of the per-label F1 over `labels` (default: every label in gold or predictions)."""
    accuracy(gold, predicted)  # length checks
    labels = sorted(set(gold) | set(predicted)) if labels is None else list(labels)
    scores = []
    for label in labels:
        hits = sum(g == p == label for g, p in zip(gold, predicted))
        scores.append(_f1(hits, sum(p == label for p in predicted), sum(g == label for g in gold))[2])
    return sum(scores) / len(scores)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sequence of BIO tags ("O", "B-X", "I-X")."""
    found, current = set(), None
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            found.add((current[0], current[1], index - 1))
            current = None
        if prefix == "B" or (prefix == "I" and not continues):
            current = (kind, index)
        elif prefix not in ("I", "O"):
            raise ValueError(f"tags: {tag!r} is not a BIO tag (O, B-TYPE, I-TYPE)")
    return found


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro precision / recall / F1 over entities of all sequences, and the same per entity type."""
    if len(gold) != len(predicted):
        raise ValueError(f"predictions: need as many sequences as the {len(gold)} gold ones, got {len(predicted)}")
    hits, guessed, actual = Counter(), Counter(), Counter()
    for gold_tags, predicted_tags in zip(gold, predicted):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(f"predictions: a sequence has {len(predicted_tags)} tags for {len(gold_tags)} tokens")
        true, guess = entities(gold_tags), entities(predicted_tags)
        for counter, spans in ((hits, true & guess), (guessed, guess), (actual, true)):
            counter.update(kind for kind, _, _ in spans)
    precision, recall, f1 = _f1(sum(hits.values()), sum(guessed.values()), sum(actual.values()))
    per_type = {kind: dict(zip(("precision", "recall", "f1"), _f1(hits[kind], guessed[kind], actual[kind])),
                           entities=actual[kind]) for kind in sorted(set(actual) | set(guessed))}
    return {"precision": precision, "recall": recall, "f1": f1, "entities": sum(actual.values()),
            "per_type": per_type}


__all__ = ["accuracy", "entities", "entity_scores", "macro_f1"]


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
