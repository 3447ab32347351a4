"""MMLU: the test set, its prompts, and accuracy per subject, per category and overall.

The data is the MMLU test set as JSON lines (`python -m gpt fetch mmlu`): one question per
line with `question`, `answer_a`..`answer_d`, `correct_answer` (A-D) and `topic` (the subject,
e.g. "college biology"). The file has two stray header rows (`correct_answer` "answer");
they are skipped with a note.

The prompt is the standard one, as lm-evaluation-harness builds it:

    The following are multiple choice questions (with answers) about college biology.

    <K example questions of the same subject, each with its answer letter>

    <question>
    A. <answer a>
    B. <answer b>
    C. <answer c>
    D. <answer d>
    Answer:

and scored by log-likelihood (gpt.evaluate.multiple_choice) in one of two formats:

    mcf     the choices are the letters " A" .. " D"
    cloze   the choices are the answer texts (after "Answer:")

K-shot examples come from the same subject, drawn once per subject with a seed, so every
question of a subject shows the same ones (never itself: a question that was drawn gets the
next one in its place); the prompt is a few-shot prompt of gpt.few_shot (each example's
output is " <letter>").
Subjects group into lm-evaluation-harness' four categories (STEM, humanities, social
sciences, other); a category's accuracy is over its questions, not a mean of subjects.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..few_shot import Example, FewShotTemplate, draw_examples
from .multiple_choice import MultipleChoiceItem

LETTERS = "ABCD"
FORMATS = ("mcf", "cloze")
CATEGORY_SUBJECTS = {
    "stem": ["abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
             "college computer science", "college mathematics", "college physics", "computer security",
             "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
             "high school chemistry", "high school computer science", "high school mathematics",
             "high school physics", "high school statistics", "machine learning"],
    "humanities": ["formal logic", "high school european history", "high school us history",
                   "high school world history", "international law", "jurisprudence", "logical fallacies",
                   "moral disputes", "moral scenarios", "philosophy", "prehistory", "professional law",
                   "world religions"],
    "social sciences": ["econometrics", "high school geography", "high school government and politics",
                        "high school macroeconomics", "high school microeconomics", "high school psychology",
                        "human sexuality", "professional psychology", "public relations", "security studies",
                        "sociology", "us foreign policy"],
    "other": ["business ethics", "clinical knowledge", "college medicine", "global facts", "human aging",
              "management", "marketing", "medical genetics", "miscellaneous", "nutrition",
              "professional accounting", "professional medicine", "virology"],
}  # fmt: skip
CATEGORY_OF = {subject: category for category, subjects in CATEGORY_SUBJECTS.items() for subject in subjects}


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]  # the four answer texts, A to D
    answer: int  # 0-3
    line: int  # in the data file, for messages and per-item output


def read_mmlu(path: Path) -> list[Question]:
    """The questions of an MMLU JSON-lines file; a malformed line is a UserError naming it."""
    questions, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row["correct_answer"] == "answer":  # a header row left in the file
                    skipped.append(number)
                    continue
                questions.append(Question(row["topic"], row["question"],
                                          [row[f"answer_{letter.lower()}"] for letter in LETTERS],
                                          LETTERS.index(row["correct_answer"]), number))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
                raise UserError(f"{path}, line {number}: not an MMLU question ({type(err).__name__}: {err})") from None
    if skipped:
        print(f"[{path}: skipped {len(skipped)} header row(s) inside the data, line(s) {skipped}]", file=sys.stderr)
    return questions


def select(questions: Sequence[Question], subjects: Sequence[str] | None, limit: int | None) -> list[Question]:
    """The questions of the given subjects (all by default), the first `limit` of each subject if given."""
    known = sorted({q.subject for q in questions})
    unknown = [s for s in subjects or [] if s not in known]
    if unknown:
        raise UserError(f"--subjects: unknown subject(s) {unknown}; known: {', '.join(known)}")
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for question in questions:
        if subjects and question.subject not in subjects:
            continue
        if limit is not None and taken[question.subject] >= limit:
            continue
        taken[question.subject] += 1
        chosen.append(question)
    return chosen


def format_question(question: Question) -> str:
    """The question and its lettered choices, up to the "Answer:" that the answer letter follows."""
    lines = [question.question.strip(), *(f"{letter}. {text}" for letter, text in zip(LETTERS, question.choices))]
    return "\n".join(lines) + "\nAnswer:"


def prompt(question: Question, shots: Sequence[Question]) -> str:
    """The standard MMLU prompt for `question` after its `shots` examples (module docstring): a few-shot
    prompt whose examples are the questions with " <letter>" as their output."""
    template = FewShotTemplate(example="{input}{output}", separator="\n\n",
                               header=f"The following are multiple choice questions (with answers) about "
                                      f"{question.subject}.\n\n")
    examples = [Example(format_question(shot), f" {LETTERS[shot.answer]}", shot.line) for shot in shots]
    return template.prompt(examples, format_question(question))


def build_items(
    questions: Sequence[Question], pool: Sequence[Question], shots: int, seed: int, fmt: str
) -> tuple[list[MultipleChoiceItem], list[list[int]]]:
    """Scoring items for `questions`, each after `shots` examples of its subject in `pool`; returns the items
    and each item's example lines.

    The examples are drawn once per subject (seeded by `seed` and the subject's name), as the harness shows
    every question of a subject the same ones: a question never sees itself, so one that was drawn gets the
    next drawn example in its place. Prompts that begin alike run their shared start once when scored.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for candidate in pool:
        by_subject[candidate.subject].append(candidate)
    drawn = {subject: draw_examples(candidates, min(shots + 1, len(candidates)), random.Random(f"{seed}:{subject}"),
                                    lambda q: False, where=f"subject {subject!r}", unit="questions")
             for subject, candidates in by_subject.items()}
    items, examples = [], []
    for question in questions:
        chosen = [q for q in drawn[question.subject] if q.line != question.line][:shots]
        if len(chosen) < shots:
            others = sum(q.line != question.line for q in by_subject[question.subject])
            raise UserError(f"--shots {shots}: subject {question.subject!r} has only {others} other questions")
        choices = [f" {letter}" for letter in LETTERS] if fmt == "mcf" else [f" {text}" for text in question.choices]
        items.append(MultipleChoiceItem(prompt(question, chosen), choices, question.answer))
        examples.append([q.line for q in chosen])
    return items, examples


def accuracy_report(questions: Sequence[Question], scored: Sequence[dict], pick: str = "pred") -> dict:
    """Accuracy overall, per category and per subject (counts included), by the scored items' `pick`."""
    groups: dict[str, dict[str, list[int]]] = {"subjects": defaultdict(list), "categories": defaultdict(list)}
    for question, entry in zip(questions, scored):
        correct = int(entry[pick] == entry["answer"])
        groups["subjects"][question.subject].append(correct)
        groups["categories"][CATEGORY_OF.get(question.subject, "other")].append(correct)

    def summary(hits: list[int]) -> dict[str, float]:
        return {"accuracy": sum(hits) / len(hits), "questions": len(hits)}

    everything = [hit for hits in groups["subjects"].values() for hit in hits]
    return {"overall": summary(everything) if everything else {"accuracy": 0.0, "questions": 0},
            "categories": {name: summary(hits) for name, hits in sorted(groups["categories"].items())},
            "subjects": {name: summary(hits) for name, hits in sorted(groups["subjects"].items())}}
