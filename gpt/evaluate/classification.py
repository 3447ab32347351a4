"""Classification metrics: accuracy, precision/recall/F1 per class, macro F1, ROC AUC, a tuned threshold.

They take class indices 0 .. K-1 into a list of label names and compute everything from
the confusion matrix, in plain numpy; a ratio whose denominator is zero counts as 0.0
(scikit-learn's `zero_division=0`). tests/test_evaluate.py checks each against
scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UserError

# Class indices or scores: a list, a 1-D numpy array or a 1-D tensor (any device).
Values = Sequence[int] | Sequence[float] | np.ndarray | torch.Tensor


def classification_report(
    y_true: Values, y_pred: Values, labels: Sequence[str], y_score: Values | None = None
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    `y_true` and `y_pred` hold class indices into `labels`. The result, plain
    Python numbers ready for JSON:

        accuracy          share of examples predicted right
        macro_f1          unweighted mean of the per-class F1 over all labels
        per_class         {label: {precision, recall, f1, support}}
        confusion_matrix  K x K list of lists, [true class][predicted class] = count
        roc_auc           two classes and `y_score` given only: the area under the ROC
                          curve of `y_score` (the probability of class 1); None when
                          y_true holds a single class, where it is undefined

    A zero denominator gives 0.0: the precision of a class never predicted, the
    recall of a class absent from `y_true`, the F1 of a class with neither.
    """
    labels = _check_labels(labels)
    true = _class_indices(y_true, "y_true", len(labels))
    pred = _class_indices(y_pred, "y_pred", len(labels))
    if len(true) != len(pred):
        raise UserError(f"y_true has {len(true)} examples but y_pred has {len(pred)}")
    if len(true) == 0:
        raise UserError("no examples to evaluate: y_true is empty")

    n_classes = len(labels)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)  # (true, predicted)
    np.add.at(confusion, (true, pred), 1)
    correct = np.diag(confusion)  # (K,) true positives of each class
    predicted = confusion.sum(axis=0)  # (K,) true + false positives
    support = confusion.sum(axis=1)  # (K,) true positives + false negatives
    precision = _ratio_or_zero(correct, predicted)
    recall = _ratio_or_zero(correct, support)
    f1 = _ratio_or_zero(2 * correct, predicted + support)  # 2 TP / (2 TP + FP + FN) = harmonic mean of P and R

    report: dict[str, Any] = {
        "accuracy": float(correct.sum() / len(true)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion.tolist(),
    }
    if y_score is not None:
        if n_classes != 2:
            raise UserError(f"y_score (ROC AUC) needs two classes; labels has {n_classes}: {labels}")
        report["roc_auc"] = _roc_auc(true == 1, _scores(y_score, "y_score", len(true)))
    return report


def tune_threshold(y_true: Values, scores: Values) -> tuple[float, float]:
    """The threshold on the positive-class probability that maximizes the positive class's F1.

    The decision rule is `score >= threshold` -> class 1. Every distinct score is
    tried as the threshold (any threshold in between gives the same predictions);
    among equally good ones the highest wins. Returns (threshold, F1 at it).
    `y_true` holds 0/1 labels and needs at least one 1.
    """
    true = _class_indices(y_true, "y_true", 2)
    scores = _scores(scores, "scores", len(true))
    n_positive = int(true.sum())
    if n_positive == 0:
        raise UserError(f"tune_threshold needs at least one positive (1) example in y_true; got {len(true)} negatives")

    order = np.argsort(-scores, kind="stable")  # highest score first
    sorted_scores = scores[order]
    true_positives = np.cumsum(true[order])  # (N,) if the top i+1 scores are called positive
    predicted_positive = np.arange(1, len(true) + 1)
    # A threshold equal to a score calls all of that score's ties positive: keep the last of each run.
    end_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    f1 = 2 * true_positives[end_of_run] / (predicted_positive[end_of_run] + n_positive)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    return float(sorted_scores[end_of_run][best]), float(f1[best])


def format_report_markdown(before: dict[str, Any], after: dict[str, Any], labels: Sequence[str]) -> str:
    """Two `classification_report` results side by side as Markdown, for a run's `report.md`.

    A table of metric | before | after | change (overall metrics, then each
    class), followed by the two confusion matrices.
    """
    labels = _check_labels(labels)
    for name, report in (("before", before), ("after", after)):
        missing = [label for label in labels if label not in report["per_class"]]
        if missing:
            raise UserError(f"{name} report has no class {missing[0]!r}; its classes: {list(report['per_class'])}")

    rows: list[tuple[str, Any, Any]] = [
        ("accuracy", before["accuracy"], after["accuracy"]),
        ("macro F1", before["macro_f1"], after["macro_f1"]),
    ]
    if "roc_auc" in before or "roc_auc" in after:
        rows.append(("ROC AUC", before.get("roc_auc"), after.get("roc_auc")))
    for label in labels:
        for key, title in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("support", "support")):
            rows.append((f"{label} {title}", before["per_class"][label][key], after["per_class"][label][key]))

    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name, old, new in rows:
        change = "n/a" if old is None or new is None else _format_number(new - old, signed=True)
        lines.append(f"| {_cell(name)} | {_format_number(old)} | {_format_number(new)} | {change} |")
    for name, report in (("before", before), ("after", after)):
        lines += ["", f"Confusion matrix {name} (rows: true class, columns: predicted class):", ""]
        lines.append("| true \\ predicted | " + " | ".join(_cell(label) for label in labels) + " |")
        lines.append("|---|" + "---:|" * len(labels))
        for label, row in zip(labels, report["confusion_matrix"]):
            lines.append(f"| {_cell(label)} | " + " | ".join(str(count) for count in row) + " |")
    return "\n".join(lines) + "\n"


def _roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve, as the Mann-Whitney U statistic: the chance that a random
    positive scores above a random negative, a tie counting one half. None without both classes.

    Ranking all scores (tied scores sharing the mean of their ranks), the positives'
    rank sum minus its smallest possible value n_pos (n_pos + 1) / 2 counts the
    (positive, negative) pairs the positive wins; this equals the trapezoid area
    under the ROC curve over all thresholds.
    """
    n_positive = int(is_positive.sum())
    n_negative = len(is_positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    _, value_index, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct score's first occurrence
    mean_rank = first_rank + (counts - 1) / 2  # tied scores share the mean of their ranks
    ranks = mean_rank[value_index.reshape(-1)]  # (N,)
    wins = ranks[is_positive].sum() - n_positive * (n_positive + 1) / 2
    return float(wins / (n_positive * n_negative))


def _ratio_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0.0 where the denominator is 0."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator != 0)


def _as_1d(values: Values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise UserError(f"{name}: expected a 1-D sequence, got shape {array.shape}")
    return array


def _class_indices(values: Values, name: str, n_classes: int) -> np.ndarray:
    """Check that `values` are integer class indices in 0 .. n_classes-1; return them as int64."""
    array = _as_1d(values, name)
    if array.size == 0:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise UserError(f"{name}: expected integer class indices, got values of type {array.dtype} (e.g. {array[0]!r})")
    array = array.astype(np.int64)
    outside = array[(array < 0) | (array >= n_classes)]
    if outside.size:
        raise UserError(f"{name}: class index {outside[0]} is outside 0..{n_classes - 1} ({n_classes} classes)")
    return array


def _scores(values: Values, name: str, n_examples: int) -> np.ndarray:
    """Check that `values` are `n_examples` finite numbers; return them as float64."""
    array = _as_1d(values, name)
    if len(array) != n_examples:
        raise UserError(f"{name} has {len(array)} values but there are {n_examples} examples")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise UserError(f"{name}: expected numbers, got values of type {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise UserError(f"{name}: value {array[~np.isfinite(array)][0]} is not finite")
    return array


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels:
        raise UserError("labels: empty; a classifier needs at least one class name")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"labels: {duplicates[0]!r} appears more than once in {labels}")
    return labels


def _format_number(value: Any, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    sign = "+" if signed else ""
    if isinstance(value, (int, np.integer)):
        return f"{value:{sign}d}"
    return f"{value:{sign}.4f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|")
