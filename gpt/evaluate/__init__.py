"""Evaluation: how good a model is, measured before and after training.

    language_model.py     next-token loss and perplexity on batches or a long text (sliding windows), bits per byte
    classification.py     accuracy, per-class precision/recall/F1, macro F1, ROC AUC, a tuned threshold
    classifier_report.py  a fine-tuned classifier before and after: test metrics, report.json / report.md
    instruction.py        greedy answers, exact match / BLEU / ROUGE-L per task, response loss, the reports
    text_overlap.py       corpus BLEU and ROUGE-L of answers against references (sacrebleu's, rouge-score's)
    multiple_choice.py    log-likelihood scoring of multiple-choice items (acc, acc_norm) as lm-evaluation-harness does
    harness.py            lm-evaluation-harness' `--model gpt` backend (the eval extra), python -m gpt lm-eval

The first two and text_overlap.py are re-exported here; the others, which need the model
code, are imported from their modules.

Every metric is checked against an independent reference in the tests (scikit-learn for
classification, the plain cross-entropy of the logits for the language-model loss,
transformers on the same weights for multiple-choice log-likelihoods, sacrebleu and
rouge-score for BLEU and ROUGE-L).
"""

from .classification import classification_report, format_report_markdown, tune_threshold
from .language_model import language_model_metrics, next_token_loss, sliding_window_loss, text_metrics
from .text_overlap import corpus_bleu, mean_rouge_l, rouge_l

__all__ = ["classification_report", "format_report_markdown", "tune_threshold", "language_model_metrics",
           "next_token_loss", "sliding_window_loss", "text_metrics", "corpus_bleu", "mean_rouge_l", "rouge_l"]
