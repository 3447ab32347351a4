"""Evaluation: how good a model is, measured before and after training.

    language_model.py     next-token loss and perplexity on batches or a long text (sliding windows)
    classification.py     accuracy, per-class precision/recall/F1, macro F1, ROC AUC, a tuned threshold
    classifier_report.py  a fine-tuned classifier before and after: test metrics, report.json / report.md
    instruction.py        greedy answers, exact match per task, the response loss, the instruct reports
    multiple_choice.py    log-likelihood scoring of multiple-choice items (acc, acc_norm) as lm-evaluation-harness does

The first two are re-exported here; the others, which need the model code, are
imported from their modules.

Every metric is checked against an independent reference in the tests (scikit-learn for
classification, the plain cross-entropy of the logits for the language-model loss,
transformers on the same weights for multiple-choice log-likelihoods).
"""

from .classification import classification_report, format_report_markdown, tune_threshold
from .language_model import language_model_metrics, next_token_loss, sliding_window_loss

__all__ = ["classification_report", "format_report_markdown", "tune_threshold", "language_model_metrics",
           "next_token_loss", "sliding_window_loss"]
