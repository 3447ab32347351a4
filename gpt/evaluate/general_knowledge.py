"""What fine-tuning cost in general knowledge: a fixed MMLU subset, scored before and after.

The fine-tuning scripts take an [eval] section (`EvalConfig`):

    python finetune_instruct.py --eval.mmlu 200          # 200 fixed MMLU questions in the before/after report
    python finetune_classifier.py --eval.mmlu 200 --eval.mmlu_path my_mmlu.jsonl

The N questions are the same in every run on the same file (`fixed_subset`): round j
takes the j-th question (in file order) of every subject, the subjects in turn from
each category (STEM, humanities, social sciences, other; alphabetical within one),
until N are taken. A small N still spans the four categories, N = 57 * k takes k of
every subject, and a larger N holds every smaller one. Their lines in the file are
recorded in the report.

Each question is scored 0-shot in the mcf format of gpt.evaluate.mmlu: the standard
prompt, and the letters " A" .. " D" by log-likelihood (gpt.evaluate.multiple_choice),
as `python -m gpt evaluate --task mmlu` scores them. The report holds the accuracy
overall, per category and per subject (`gpt.evaluate.mmlu.accuracy_report`).

A classifier has no LM head: gpt.classifier replaces it with a class head. Its score
reads the fine-tuned body through the LM head the model had before fine-tuning
(`original_head`: a copy taken before the class head replaces it, for a tied model a
copy of the pretrained embedding matrix; `with_lm_head` puts it back for the scoring).
Before fine-tuning that is the pretrained language model itself; after, it measures
how much of what that head reads the fine-tuned body still holds.
"""

from __future__ import annotations

import contextlib
import itertools
import typing
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import Section
from ..errors import ConfigError, UserError
from ..fetch import cached_path
from ..linear import Linear
from ..model import GPT
from ..tokenizer import Tokenizer
from .mmlu import CATEGORY_OF, CATEGORY_SUBJECTS, Question, accuracy_report, build_items, read_mmlu
from .multiple_choice import score_items


@dataclass
class EvalConfig(Section):
    """Extra measurements before and after fine-tuning (the [eval] section of the fine-tuning scripts)."""

    section_name: typing.ClassVar[str] = "eval"

    mmlu: int = field(default=0, metadata={"help": "N > 0: score N fixed MMLU questions (0-shot, answer letters) "
                                                   "before and after fine-tuning"})
    mmlu_path: str = field(default="", metadata={"help": "the MMLU JSON lines; empty = the fetched test set "
                                                         "(python -m gpt fetch mmlu)"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.mmlu < 0:
            raise ConfigError(f"eval.mmlu: must not be negative, got {self.mmlu}")


def fixed_subset(questions: Sequence[Question], n: int) -> list[Question]:
    """The first `n` questions of the fixed order (module docstring): round j holds the j-th question of every
    subject, the subjects taking turns by category."""
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_subject[question.subject].append(question)
    per_category = [sorted(s for s in by_subject if CATEGORY_OF.get(s, "other") == category)
                    for category in CATEGORY_SUBJECTS]
    subjects = [s for turn in itertools.zip_longest(*per_category) for s in turn if s is not None]
    rounds = max((len(qs) for qs in by_subject.values()), default=0)
    ordered = [by_subject[s][j] for j in range(rounds) for s in subjects if j < len(by_subject[s])]
    return ordered[:n]


@dataclass
class MMLUSubset:
    """The fixed questions a run scores before and after fine-tuning."""

    path: Path
    questions: list[Question]

    def description(self) -> dict[str, Any]:
        """What the report records about the subset: the file, the count, the questions' lines, how scored."""
        return {"path": str(self.path), "questions": len(self.questions), "shots": 0, "format": "mcf",
                "lines": [q.line for q in self.questions]}

    def score(self, model: GPT, tokenizer: Tokenizer, batch_size: int,
              autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        """Accuracy overall, per category and per subject of `model` on the subset (0-shot, mcf)."""
        items, _ = build_items(self.questions, self.questions, shots=0, seed=0, fmt="mcf")
        with autocast or contextlib.nullcontext(), \
                tqdm(total=len(items), desc="mmlu", unit="item", dynamic_ncols=True) as progress:
            scored = score_items(model, tokenizer, items, batch_size, progress.update)
        return accuracy_report(self.questions, scored)


def load_subset(config: EvalConfig) -> MMLUSubset | None:
    """The subset `config` asks for (None for eval.mmlu 0), read and checked before any work starts."""
    if config.mmlu == 0:
        return None
    path = Path(config.mmlu_path) if config.mmlu_path else cached_path("mmlu")
    if not path.is_file():
        how = "check eval.mmlu_path" if config.mmlu_path else "run `python -m gpt fetch mmlu` first"
        raise UserError(f"eval.mmlu {config.mmlu}: the MMLU questions {path} do not exist; {how}")
    questions = read_mmlu(path)
    if config.mmlu > len(questions):
        raise UserError(f"eval.mmlu {config.mmlu}: {path} holds only {len(questions)} questions")
    return MMLUSubset(path, fixed_subset(questions, config.mmlu))


def original_head(model: GPT) -> torch.Tensor:
    """A copy of `model`'s LM head weight (vocab_size, d_model), kept before a class head replaces the head."""
    return model.lm_head.weight.detach().clone()


@contextlib.contextmanager
def with_lm_head(body: GPT, weight: torch.Tensor) -> Iterator[GPT]:
    """`body` as a language model whose logits are its hidden states times `weight`, for the `with` block;
    its own head (None in a classifier) comes back after."""
    previous = body.lm_head
    device = body.tok_emb.weight.device
    head = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(weight.to(device), requires_grad=False)
    body.lm_head = head
    try:
        yield body
    finally:
        body.lm_head = previous


def markdown_rows(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Table rows `| metric | before | after | change |`: MMLU accuracy overall and per category."""
    def row(name: str, a: dict[str, float], b: dict[str, float]) -> str:
        count = f"{b['questions']} question" + ("s" if b["questions"] != 1 else "")
        return f"| {name} ({count}) | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {b['accuracy'] - a['accuracy']:+.3f} |"

    return [row("MMLU accuracy", before["overall"], after["overall"]),
            *(row(f"MMLU: {name}", before["categories"][name], scores)
              for name, scores in after["categories"].items())]


def summary_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line for the terminal: the MMLU accuracy before and after."""
    b, a = before["overall"], after["overall"]
    return f"MMLU ({a['questions']} fixed questions, 0-shot): accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}"
