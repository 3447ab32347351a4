"""A classifier before and after fine-tuning: test metrics, a threshold tuned on validation, the report files.

    report = {"labels": labels, "before": evaluate_classifier(model, datasets, labels, 64, device)}
    ... train ...
    report["after"] = evaluate_classifier(model, datasets, labels, 64, device)
    report["run"] = {...}                       # what ran: model, what trained, sizes, steps, times
    write_reports(out_dir, report, labels)      # report.json, and report.md with before | after

The metrics are `classification.classification_report`'s; the tuned threshold is the
one that maximizes the positive class's F1 on the validation split, applied to test.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_json, write_text
from ..classifier import GPTClassifier, decide, predict
from ..data import ClassificationDataset, iterate_classification_eval
from .classification import classification_report, format_report_markdown, tune_threshold
from .general_knowledge import markdown_rows

REPORT_KEYS = ("accuracy", "macro_f1", "per_class", "confusion_matrix")


def evaluate_classifier(model: GPTClassifier, datasets: dict[str, ClassificationDataset], labels: list[str],
                        batch_size: int, device: torch.device,
                        autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
    """Metrics on the test split (most likely class), and for two classes ROC AUC and the threshold
    tuned on validation with the test metrics at that threshold."""
    model.eval()

    def run(split: str) -> tuple[np.ndarray, np.ndarray, float]:
        batches = iterate_classification_eval(datasets[split], batch_size)
        return predict(model, batches, device, autocast, progress=True)

    test_probs, test_true, test_loss = run("test")
    binary = len(labels) == 2
    report = classification_report(test_true, decide(test_probs), labels,
                                   y_score=test_probs[:, 1] if binary else None)
    report["loss"] = test_loss
    report["examples"] = len(test_true)
    if binary:
        val_probs, val_true, _ = run("val")
        if val_true.any():
            threshold, val_f1 = tune_threshold(val_true, val_probs[:, 1])
            at_threshold = classification_report(test_true, decide(test_probs, threshold), labels)
            report["tuned_threshold"] = {"positive_label": labels[1], "threshold": threshold, "val_f1": val_f1,
                                         "test": {key: at_threshold[key] for key in REPORT_KEYS}}
    return report


def write_reports(out_dir: Path, report: dict[str, Any], labels: list[str]) -> None:
    """report.json always; report.md once there is an `after` to set beside `before`. Both atomic."""
    write_json(out_dir / "report.json", report)
    if "after" not in report:
        return
    run, before, after = report["run"], report["before"], report["after"]
    lines = [
        "# Classifier fine-tuning report", "",
        f"- model: {run['model']}",
        f"- trains: {run['trains']}; {run['trainable_parameters']:,} of {run['total_parameters']:,} parameters",
        f"- data: {run['split_sizes']['train']:,} train / {run['split_sizes']['val']:,} validation / "
        f"{run['split_sizes']['test']:,} test texts; labels {', '.join(labels)}",
        f"- training: {run['steps']} steps in {run['train_seconds']:.0f} s"
        + (" (stopped early)" if run["stopped_early"] else "")
        + f"; whole run {run['wall_seconds']:.0f} s; peak memory {run['peak_memory_mib']:,.0f} MiB",
        "",
        "## Test split, before and after training (the most likely class)", "",
        format_report_markdown(before, after, labels),
    ]
    if "tuned_threshold" in before and "tuned_threshold" in after:
        tb, ta = before["tuned_threshold"], after["tuned_threshold"]
        lines += [
            "## Test split with the decision threshold tuned on validation", "",
            f"Predict {labels[1]!r} when its probability is at least the threshold that maximizes its F1 on the "
            f"validation split: {tb['threshold']:.4f} before training, {ta['threshold']:.4f} after "
            "(`python -m gpt classify --threshold tuned` applies the latter).", "",
            format_report_markdown(tb["test"], ta["test"], labels),
        ]
    if "mmlu" in before and "mmlu" in after:
        lines += [
            "## General knowledge: MMLU", "",
            f"{run['mmlu_subset']['questions']} fixed questions, 0-shot, the answer letters scored by the body read "
            "through the LM head the model had before fine-tuning (the class head replaced it).", "",
            "| metric | before | after | change |", "| --- | ---: | ---: | ---: |",
            *markdown_rows(before["mmlu"], after["mmlu"]), "",
        ]
    write_text(out_dir / "report.md", "\n".join(lines))


def summary_line(name: str, report: dict[str, Any], labels: list[str]) -> str:
    """One line for the terminal: accuracy, macro F1, and for two classes the positive F1, ROC AUC, tuned F1."""
    text = f"{name}: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
    if len(labels) == 2:
        text += f", {labels[1]} F1 {report['per_class'][labels[1]]['f1']:.4f}"
        if report.get("roc_auc") is not None:
            text += f", ROC AUC {report['roc_auc']:.4f}"
        if "tuned_threshold" in report:
            tuned = report["tuned_threshold"]
            text += (f"; at the threshold {tuned['threshold']:.3f} tuned on validation: {labels[1]} F1 "
                     f"{tuned['test']['per_class'][labels[1]]['f1']:.4f}")
    return text
