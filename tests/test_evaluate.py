"""Tests for the classification metrics in gpt/evaluate.py, checked against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from gpt.errors import UserError
from gpt.evaluate import classification_report, format_report_markdown, tune_threshold

THREE = ["negative", "neutral", "positive"]
TWO = ["ham", "spam"]


def assert_matches_sklearn(y_true, y_pred, labels, report) -> None:
    classes = list(range(len(labels)))
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    for i, label in enumerate(labels):
        row = report["per_class"][label]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=classes).tolist()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("labels", [THREE, TWO])
def test_random_predictions_match_sklearn(seed, labels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    y_true = rng.integers(0, len(labels), n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, len(labels), n))  # mostly right
    assert_matches_sklearn(y_true, y_pred, labels, classification_report(y_true, y_pred, labels))


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # classes 1 and 2 neither occur nor get predicted
        ([0, 1, 0, 1], [2, 2, 2, 2]),  # class 2 predicted but absent; 0 and 1 never predicted
        ([2, 2, 1], [0, 0, 0]),  # all wrong
        ([1], [1]),  # one example
        ([0, 1, 2, 2, 1, 0], [0, 1, 2, 2, 1, 0]),  # all right
    ],
)
def test_edge_cases_match_sklearn_with_zero_division_zero(y_true, y_pred):
    report = classification_report(y_true, y_pred, THREE)
    assert_matches_sklearn(y_true, y_pred, THREE, report)


def test_zero_division_is_zero_and_report_is_plain_json():
    report = classification_report([0, 0, 1], [0, 0, 0], TWO, y_score=[0.1, 0.2, 0.3])
    assert report["per_class"]["spam"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_class"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 80
    y_true = rng.integers(0, 2, n)
    y_true[:2] = [0, 1]  # both classes present
    scores = np.round(rng.random(n) * 0.5 + 0.3 * y_true, 1)  # rounded to one decimal: many ties
    assert len(np.unique(scores)) < n // 4
    report = classification_report(y_true, (scores >= 0.5).astype(int), TWO, y_score=scores)
    assert report["roc_auc"] == pytest.approx(roc_auc_score(y_true, scores))


@pytest.mark.parametrize(
    "y_true, scores, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied
        ([0, 1, 1], [0.3, 0.3, 0.7], 0.75),  # one tied pair counts one half
    ],
)
def test_roc_auc_hand_cases(y_true, scores, expected):
    report = classification_report(y_true, [0] * len(y_true), TWO, y_score=scores)
    assert report["roc_auc"] == pytest.approx(expected)
    assert report["roc_auc"] == pytest.approx(roc_auc_score(y_true, scores))


def test_roc_auc_is_none_with_one_class_and_absent_without_scores():
    assert classification_report([1, 1], [1, 0], TWO, y_score=[0.4, 0.6])["roc_auc"] is None
    assert "roc_auc" not in classification_report([1, 0], [1, 0], TWO)


def test_tensor_inputs_on_any_dtype():
    y_true = torch.tensor([0, 1, 1, 0])
    scores = torch.tensor([0.2, 0.7, 0.4, 0.1], dtype=torch.bfloat16)
    report = classification_report(y_true, torch.tensor([0, 1, 0, 0]), TWO, y_score=scores)
    assert report["accuracy"] == 0.75
    assert report["roc_auc"] == 1.0


def brute_force_best_f1(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The best positive-class F1 over thresholds at every score and in between, by sklearn."""
    values = np.unique(scores)
    candidates = np.concatenate([values, (values[1:] + values[:-1]) / 2, [values.max() + 1.0]])
    return max(f1_score(y_true, (scores >= t).astype(int), zero_division=0) for t in candidates)


@pytest.mark.parametrize("seed", range(6))
def test_tune_threshold_finds_the_f1_optimum(seed):
    rng = np.random.default_rng(seed)
    n = 40
    y_true = (rng.random(n) < 0.3).astype(int)
    y_true[0] = 1
    scores = np.clip(rng.normal(0.35 + 0.25 * y_true, 0.2), 0, 1)
    if seed % 2:
        scores = np.round(scores, 1)  # with ties
    threshold, f1 = tune_threshold(y_true, scores)
    assert f1 == pytest.approx(brute_force_best_f1(y_true, scores))
    assert f1 == pytest.approx(f1_score(y_true, (scores >= threshold).astype(int)))
    assert threshold in scores


def test_tune_threshold_hand_case_prefers_the_highest_of_equal_thresholds():
    # scores >= 0.9 -> one TP: F1 2/3; >= 0.8 -> 1 TP + 1 FP: F1 1/2; >= 0.7 -> 2 TP + 1 FP: F1 4/5 (best).
    threshold, f1 = tune_threshold([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert (threshold, f1) == (0.7, pytest.approx(0.8))
    # A perfectly separable set: every threshold in (0.2, 0.6] is perfect; 0.6 is the one returned.
    assert tune_threshold([0, 1, 1], [0.2, 0.6, 0.9]) == (0.6, 1.0)


def test_markdown_report_side_by_side():
    before = classification_report([0, 1, 1, 0], [1, 1, 0, 0], TWO, y_score=[0.6, 0.7, 0.4, 0.3])
    after = classification_report([0, 1, 1, 0], [0, 1, 1, 0], TWO, y_score=[0.1, 0.9, 0.8, 0.2])
    text = format_report_markdown(before, after, TWO)
    lines = text.splitlines()
    assert lines[:2] == ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    assert "| accuracy | 0.5000 | 1.0000 | +0.5000 |" in lines
    assert "| macro F1 | 0.5000 | 1.0000 | +0.5000 |" in lines
    assert "| ROC AUC | 0.7500 | 1.0000 | +0.2500 |" in lines
    assert "| spam recall | 0.5000 | 1.0000 | +0.5000 |" in lines
    assert "| ham support | 2 | 2 | +0 |" in lines
    assert text.count("| true \\ predicted | ham | spam |") == 2
    assert "| ham | 1 | 1 |" in lines and "| ham | 2 | 0 |" in lines


def test_markdown_report_from_json_with_missing_auc_and_pipe_in_label():
    labels = ["a|b", "c", "d"]
    before = json.loads(json.dumps(classification_report([0, 1, 2], [0, 0, 0], labels)))
    after = classification_report([0, 1, 2], [0, 1, 2], labels)
    text = format_report_markdown(before, after, labels)
    assert "| a\\|b precision | 0.3333 | 1.0000 | +0.6667 |" in text
    assert "ROC AUC" not in text


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: classification_report([0, 3], [0, 1], THREE), r"y_true: class index 3 is outside 0..2"),
        (lambda: classification_report([0, 1], [0, -1], THREE), r"y_pred: class index -1"),
        (lambda: classification_report([0, 1, 1], [0, 1], THREE), r"y_true has 3 examples but y_pred has 2"),
        (lambda: classification_report([], [], THREE), r"y_true is empty"),
        (lambda: classification_report([0.0, 1.0], [0, 1], TWO), r"y_true: expected integer class indices"),
        (lambda: classification_report([0, 1], [0, 1], ["x", "x"]), r"labels: 'x' appears more than once"),
        (lambda: classification_report([0, 1], [0, 1], THREE, y_score=[0.1, 0.9]), r"needs two classes"),
        (lambda: classification_report([0, 1], [0, 1], TWO, y_score=[0.1]), r"y_score has 1 values"),
        (lambda: classification_report([0, 1], [0, 1], TWO, y_score=[0.1, float("nan")]), r"y_score: value nan"),
        (lambda: tune_threshold([0, 0], [0.2, 0.4]), r"at least one positive"),
        (lambda: tune_threshold([0, 2], [0.2, 0.4]), r"y_true: class index 2 is outside 0..1"),
    ],
)
def test_bad_input_raises_user_error_naming_the_value(call, message):
    with pytest.raises(UserError, match=message):
        call()


def test_markdown_report_rejects_a_missing_class():
    report = classification_report([0, 1], [0, 1], TWO)
    with pytest.raises(UserError, match="before report has no class 'eggs'"):
        format_report_markdown(report, report, ["ham", "eggs"])
