"""Text classification with a GPT: the class head, what trains, predictions, and `python -m gpt classify`.

A `GPTClassifier` is a GPT body (no LM head) with a class head `Linear(d_model, num_classes)`.
A batch of right-padded token ids and their lengths flows through it as:

    input_ids (B, T), lengths (B,)
      -> gpt.hidden_states: causal blocks + final_norm          (B, T, D)
      -> pool: the last real token's state (or the mean of the real tokens')   (B, D)
      -> head: Linear(D, num_classes)                          (B, num_classes) logits

Right padding and causal attention keep predictions independent of padding: position
i attends only to positions 0..i, so the states of a text's real tokens never see the
padding after them, and pooling reads only those states.

What trains is chosen by `gpt.scripts.set_trainable`: "head", "last:N" (the last N
blocks, the final norm and the head), "all", or "lora" (adapters plus the head).

A classifier checkpoint is an ordinary gpt checkpoint (`gpt.checkpoint`) with a
"classifier" entry: label names, pooling, max_length, the LoRA settings while adapters
are in place, and for two classes the decision threshold tuned on validation.
`load_classifier` rebuilds the model from any of them (adapters are merged on load);
`classify_cli` is the `classify` verb:

    python -m gpt classify --checkpoint runs/classifier-... "WINNER!! Claim your prize now"
    python -m gpt classify --checkpoint runs/classifier-... --file messages.txt
    python -m gpt classify --checkpoint runs/a --checkpoint runs/b --eval test.tsv

With the checkpoint given two or more times it classifies with an ensemble: the mean of
the models' class probabilities (`ensemble_probabilities`; the models must have the same
labels in the same order, and may read the texts with different tokenizers). `--eval`
scores labelled texts: accuracy, macro F1 and per-class F1 (and each member's, for an
ensemble).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import cli_args
from .checkpoint import load_checkpoint, load_model_state, resolve_checkpoint_path
from .config import ModelConfig, Section, check_choice
from .data import ClassificationDataset, iterate_classification_eval, read_labeled_texts
from .errors import ConfigError, UserError
from .evaluate.classification import classification_report
from .files import json_lines
from .lora import apply_lora, merge_lora
from .quantize import parse_scheme, quantize_model
from .model import GPT
from .runtime import pick_device
from .tokenizer import Tokenizer, get_tokenizer

POOLINGS = ("last", "mean")


@dataclass
class ClassifierConfig(Section):
    """The class head and its input (the [classifier] section of finetune_classifier.py)."""

    section_name: typing.ClassVar[str] = "classifier"

    pooling: str = field(default="last",
                         metadata={"help": "last (the last real token's state) | mean (of the real tokens')"})
    max_length: int = field(default=0, metadata={"help": "texts are cut to this many tokens; 0 = the model's "
                                                         "context length, at most 512"})

    def __post_init__(self) -> None:
        self._check_types()
        check_choice("classifier.pooling", self.pooling, POOLINGS)
        if self.max_length < 0:
            raise ConfigError(f"classifier.max_length: must not be negative, got {self.max_length}")

    def length_for(self, context_length: int) -> int:
        """The longest text in tokens for a model with this context length."""
        return self.max_length or min(context_length, 512)

# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text from hidden states (B, T, D) of right-padded texts with `lengths` (B,) real tokens:
    "last" -> the state of the last real token, "mean" -> the mean over the real tokens. Returns (B, D)."""
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths - 1]  # (B, D)
    real = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
    summed = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(dim=1)  # (B, D)
    return summed / lengths[:, None].to(summed.dtype)


class GPTClassifier(nn.Module):
    """A GPT body with a class head: `model(input_ids, lengths)` -> logits (B, num_classes).

    The GPT's LM head is dropped (`gpt.lm_head` is None: this model predicts classes, not
    tokens); `head` is a new `Linear(d_model, num_classes)`. `max_length` is the longest
    input the classifier was trained on (texts are cut to it); it sets the sequence length
    behind `flops_per_token`.
    """

    def __init__(self, gpt: GPT, num_classes: int, pooling: str = "last", max_length: int | None = None) -> None:
        super().__init__()
        check_choice("classifier.pooling", pooling, POOLINGS)
        if num_classes < 2:
            raise UserError(f"a classifier needs at least two classes, got {num_classes}")
        max_length = max_length or gpt.config.context_length
        if max_length > gpt.config.context_length:
            raise UserError(f"classifier.max_length {max_length} exceeds the model's context_length "
                            f"{gpt.config.context_length}")
        self.gpt = gpt
        self.pooling = pooling
        self.max_length = max_length
        weight = gpt.tok_emb.weight
        gpt.lm_head = None  # a tied head shared the embedding; an untied one would be dead weight
        # Small random weights and a zero bias (the GPT's own init).
        self.head = nn.Linear(gpt.config.d_model, num_classes, bias=True, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def upgrade_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights saved before the class head had its own name (`gpt.lm_head.*`), renamed to `head.*`."""
        return {("head." + key.removeprefix("gpt.lm_head.") if key.startswith("gpt.lm_head.") else key): tensor
                for key, tensor in weights.items()}

    @property
    def config(self) -> ModelConfig:
        """The GPT's config (what a checkpoint stores as model_config)."""
        return self.gpt.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded token ids (B, T) and real lengths (B,) -> class logits (B, num_classes)."""
        hidden = self.gpt.hidden_states(input_ids)  # (B, T, D), plain causal attention
        return self.head(pool(hidden, lengths, self.pooling))  # (B, num_classes)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token if everything trained (see `GPT.flops_per_token`), at `max_length` tokens:
        the body's (which has no LM head) plus the class head's."""
        return self.gpt.flops_per_token(seq_len or self.max_length) + 6 * self.head.weight.numel()


# ----------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: GPTClassifier, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device | str,
    autocast: contextlib.AbstractContextManager | None = None, class_weight: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities (N, C) and true labels (N,) over `batches` of (ids, lengths, labels), and the mean
    cross-entropy (weighted by `class_weight` the way `F.cross_entropy` weighs it). Eval mode is the caller's."""
    probabilities, labels = [], []
    loss_sum, weight_sum = 0.0, 0.0
    for ids, lengths, batch_labels in tqdm(batches, desc="predict", disable=None if progress else True, leave=False):
        ids, lengths, batch_labels = ids.to(device), lengths.to(device), batch_labels.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(ids, lengths).float()  # (B, C)
        weights = class_weight[batch_labels] if class_weight is not None else torch.ones_like(logits[:, 0])
        loss_sum += float((F.cross_entropy(logits, batch_labels, reduction="none") * weights).sum())
        weight_sum += float(weights.sum())
        probabilities.append(logits.softmax(dim=-1).cpu())
        labels.append(batch_labels.cpu())
    if not labels:
        raise UserError("no examples to predict")
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy(), loss_sum / max(weight_sum, 1e-12)


def decide(probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class ids from probabilities (N, C): the most likely class, or with two classes and a
    `threshold`, class 1 where its probability is at least the threshold. Returns (N,) int64."""
    if threshold is not None and probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def classifier_info(labels: Sequence[str], pooling: str, max_length: int, pad_id: int,
                    lora: dict[str, Any] | None = None, threshold: float | None = None) -> dict[str, Any]:
    """The "classifier" entry of a checkpoint: plain values, loadable with weights_only=True."""
    return {"labels": list(labels), "pooling": pooling, "max_length": max_length, "pad_id": pad_id,
            "lora": None if lora is None else {**lora, "targets": list(lora["targets"])}, "threshold": threshold}


def resolve_classifier_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder -> its checkpoints/final.pt (the merged final model), else best.pt,
    else latest.pt."""
    path = Path(path)
    final = path / "checkpoints" / "final.pt"
    return final if path.is_dir() and final.is_file() else resolve_checkpoint_path(path, "best")


def classifier_checkpoint(source: str) -> Path | None:
    """The checkpoint file when `source` is a classifier checkpoint or run folder, else None."""
    path = Path(source).expanduser()
    if not path.exists() or path.suffix.lower() == ".gguf" or (path / "config.json").is_file():
        return None
    try:
        file = resolve_classifier_checkpoint(path)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # mapped: reads no weights
    except Exception:  # not a checkpoint: the language-model loader says what is wrong with it
        return None
    return file if isinstance(state, dict) and isinstance(state.get("classifier"), dict) else None


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPTClassifier, dict[str, Any], str]:
    """(model in eval mode, the checkpoint's "classifier" entry, tokenizer name) from a classifier checkpoint
    or run folder. A checkpoint saved with LoRA adapters in place gets them back, merged."""
    file = resolve_classifier_checkpoint(path)
    state = load_checkpoint(file, map_location=device)
    info = state.get("classifier")
    if not isinstance(info, dict):
        raise UserError(f"{file}: not a classifier checkpoint (no 'classifier' entry); "
                        "it may be a language model: try python -m gpt generate")
    try:
        config = ModelConfig.from_dict(state["model_config"])
    except ConfigError as err:
        raise UserError(f"{file}: bad model_config: {err}") from None
    with torch.device("meta"):  # no time spent on a random init that the checkpoint replaces
        gpt = GPT(config)
    model = GPTClassifier(gpt, len(info["labels"]), info["pooling"], info["max_length"])
    has_adapters = any(key.endswith(".lora_A") for key in state["model"])
    if has_adapters:
        apply_lora(model.gpt, **info["lora"])
    model.to_empty(device=device)
    load_model_state(model, GPTClassifier.upgrade_state_dict(state["model"]), file)
    gpt.reset_rope_tables(device)  # buffers derived from the config, not stored in the checkpoint
    if has_adapters:
        merge_lora(model.gpt)
    return model.eval(), info, state.get("tokenizer", "gpt2")


# ----------------------------------------------------------------------------
# python -m gpt classify
# ----------------------------------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """Texts to classify: a .jsonl file's "text" fields, else one text per non-blank line."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read texts ({err})") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, record in json_lines(path, content):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{path}, line {number}: expected an object with a string "text" field')
            texts.append(record["text"].strip())
    else:
        texts = [line.strip() for line in content.split("\n") if line.strip()]
    if not texts:
        raise UserError(f"{path}: no texts in the file")
    return texts


def classify_texts(model: GPTClassifier, tokenizer: Tokenizer, texts: Sequence[str], pad_id: int,
                   batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, C) for `texts`, each cut to the model's max_length tokens.

    Texts go through in order of length, so a batch holds little padding; the result is in input order."""
    token_ids = tokenizer.encode_batch(list(texts))
    empty = [i for i, ids in enumerate(token_ids) if not ids]
    if empty:
        raise UserError(f"text {empty[0] + 1} is empty")
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    dataset = ClassificationDataset([token_ids[i] for i in order], [0] * len(texts), model.max_length, pad_id)
    device = next(model.parameters()).device
    probabilities, _, _ = predict(model, iterate_classification_eval(dataset, batch_size), device,
                                  progress=len(texts) > 4 * batch_size)
    result = np.empty_like(probabilities)
    result[order] = probabilities
    return result


def parse_threshold(text: str | None, info: dict[str, Any], ensemble: bool = False) -> float | None:
    """--threshold: None (the most likely class), "tuned" (the checkpoint's; not for an ensemble), or a number
    in [0, 1]."""
    if text is None:
        return None
    if len(info["labels"]) != 2:
        raise UserError(f"--threshold needs a two-class model; this one has {len(info['labels'])} classes")
    if text == "tuned" and ensemble:
        raise UserError("--threshold tuned: each checkpoint's threshold was tuned on its own model's probabilities "
                        "and does not carry over to the ensemble's mean; give a number (e.g. 0.5) or leave "
                        "--threshold out for the most likely class")
    if text == "tuned":
        if info.get("threshold") is None:
            raise UserError("--threshold tuned: this checkpoint holds no tuned threshold (only final.pt does)")
        return float(info["threshold"])
    try:
        threshold = float(text)
    except ValueError:
        raise UserError(f"--threshold: expected a number or 'tuned', got {text!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold: must be between 0 and 1, got {threshold}")
    return threshold


@dataclass
class Member:
    """One classifier of those `classify` loads: where it came from, the model, its checkpoint's
    "classifier" entry and its tokenizer."""

    source: str
    model: GPTClassifier
    info: dict[str, Any]
    tokenizer: Tokenizer


def load_members(sources: Sequence[str], device: torch.device | str) -> list[Member]:
    """The classifiers of `sources`, which must have the same labels in the same order (a UserError naming
    the first that differs, and both label lists, stops the loading there)."""
    members: list[Member] = []
    for source in sources:
        model, info, tokenizer_name = load_classifier(source, device)
        if members and info["labels"] != members[0].info["labels"]:
            raise UserError(f"an ensemble needs the same labels in the same order: {members[0].source} has "
                            f"{members[0].info['labels']} but {source} has {info['labels']}")
        members.append(Member(source, model, info, get_tokenizer(tokenizer_name)))
    return members


def ensemble_probabilities(members: Sequence[Member], texts: Sequence[str],
                           batch_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """The mean of the members' class probabilities (N, C), and each member's own (N, C); each member reads
    the texts with its own tokenizer, cut to its own max_length."""
    own = [classify_texts(m.model, m.tokenizer, texts, m.info["pad_id"], batch_size) for m in members]
    return np.mean(own, axis=0), own


def read_labelled(path: Path, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Texts and their class ids (N,) from a TSV, CSV or JSONL file read as finetune_classifier.py reads
    data.path (default columns); a label the model does not have names its file and line."""
    index = {label: i for i, label in enumerate(labels)}
    examples = read_labeled_texts(path)
    for example in examples:
        if example.label not in index:
            raise UserError(f"{example.source}: label {example.label!r} is not one of the model's labels "
                            f"({', '.join(labels)})")
    return [e.text for e in examples], np.array([index[e.label] for e in examples], dtype=np.int64)


def labelled_scores(true: np.ndarray, probabilities: np.ndarray, labels: list[str],
                    threshold: float | None) -> dict[str, Any]:
    """`classification_report` of the decisions `decide(probabilities, threshold)`, with ROC AUC for two classes."""
    return classification_report(true, decide(probabilities, threshold), labels,
                                 y_score=probabilities[:, 1] if len(labels) == 2 else None)


def classify_cli(argv: list[str]) -> int:
    """`python -m gpt classify --checkpoint RUN [--checkpoint RUN ...] TEXT... | --file FILE | --eval FILE`:
    labels with probabilities, or the scores on labelled texts."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt classify",
        description="Classify texts with a model trained by finetune_classifier.py. Prints, for each text, the "
                    "predicted label (the most likely class), the probability of every class, and the text; "
                    "with --eval, the scores on labelled texts instead. With the checkpoint given two or more "
                    "times, an ensemble: the mean of the models' class probabilities.",
    )
    parser.add_argument("--checkpoint", "--model", dest="checkpoints", action="append", metavar="RUN",
                        help="a run folder of finetune_classifier.py, or a checkpoint file; give it two or more "
                             "times for an ensemble (the models must have the same labels in the same order)")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", type=cli_args.existing_file,
                        help="more texts: one per line, or a .jsonl file with a \"text\" field")
    parser.add_argument("--eval", type=cli_args.existing_file, metavar="FILE",
                        help="labelled texts, TSV, CSV or JSONL as finetune_classifier.py reads data.path: print "
                             "accuracy, macro F1, per-class precision/recall/F1 and ROC AUC (two classes) as JSON, "
                             "for an ensemble each member's too")
    parser.add_argument("--threshold", default=None,
                        help="two classes: predict the second label when its probability is at least this number, "
                             "or 'tuned' for the threshold tuned on validation (saved with the model; one model only)")
    parser.add_argument("--json", action="store_true", help="one JSON object per text instead of aligned columns")
    parser.add_argument("--batch-size", type=cli_args.positive_int, default=32,
                        help="texts per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    parser.add_argument("--quantize", metavar="SCHEME", default=None,
                        help="quantize the body's projections as the model loads: int8, int4 or int4:G "
                             "(the class head stays float)")
    args = parser.parse_args(argv)
    if not args.checkpoints:
        parser.error("give the classifier: --checkpoint RUN (two or more for an ensemble)")
    if args.eval and (args.texts or args.file):
        parser.error("--eval scores a labelled file; give it alone, without texts or --file")
    scheme = parse_scheme(args.quantize) if args.quantize else None
    texts = [text.strip() for text in args.texts] + (read_texts(args.file) if args.file else [])
    if not texts and not args.eval:
        parser.error("give texts to classify, --file FILE, or --eval FILE (labelled texts)")
    if any(not text for text in texts):
        raise UserError("a text to classify is empty")

    members = load_members(args.checkpoints, pick_device(args.device, "--device"))
    for member in members if scheme is not None else []:
        quantize_model(member.model.gpt, scheme, include_head=False)
    labels = members[0].info["labels"]
    threshold = parse_threshold(args.threshold, members[0].info, ensemble=len(members) > 1)
    if len(members) > 1:
        print(f"[ensemble of {len(members)} classifiers: the mean of their class probabilities]", file=sys.stderr)
    if threshold is not None:
        print(f"[{labels[1]!r} when its probability is at least {threshold:.4f}]", file=sys.stderr)
    if args.eval:
        texts, true = read_labelled(args.eval, labels)
    probabilities, own = ensemble_probabilities(members, texts, args.batch_size)
    if args.eval:
        report = {"file": str(args.eval), "examples": len(texts), "models": args.checkpoints, "threshold": threshold,
                  **labelled_scores(true, probabilities, labels, threshold)}
        if len(members) > 1:
            report["members"] = [{"model": member.source, **labelled_scores(true, probs, labels, threshold)}
                                 for member, probs in zip(members, own)]
        print(json.dumps(report, indent=2))
        return 0
    predicted = decide(probabilities, threshold)
    width = max(len(label) for label in labels)
    for text, row, label_id in zip(texts, probabilities, predicted):
        label = labels[label_id]
        if args.json:
            print(json.dumps({"text": text, "label": label,
                              "probabilities": {name: round(float(p), 6) for name, p in zip(labels, row)}},
                             ensure_ascii=False))
        else:
            scores = "  ".join(f"{name} {p:.4f}" for name, p in zip(labels, row))
            print(f"{label:<{width}}  {scores}  {text}")
    return 0
