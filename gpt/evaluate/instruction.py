"""Instruction-following evaluation: greedy answers scored against the references per task family, a report.

    answers = answer_all(model, tokenizer, records, "chatml", max_new_tokens=32, batch_size=16)
    scores = score(records, answers, response_loss)       # exact_match, bleu, rouge_l, per task; response_loss
    write_reports(out_dir, before, after, rows, run)       # report.json, report.md, responses.jsonl

An answer matches when it equals the record's expected response after lower-casing and
collapsing whitespace (`normalize`). BLEU (0-100, pooled over the answers) and ROUGE-L
(0-1, the mean over answers) give credit for the part of an answer that is right
(`text_overlap.py`). A task whose answers are all shorter than four BLEU tokens has no
4-grams, so its BLEU is 0 even when every answer is right; ROUGE-L still tells. The
response loss is the mean next-token loss of the reference responses given their prompts
(`language_model_metrics` over a masked `InstructionDataset`): it moves even when no
answer flips to exactly right.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..files import write_json, write_text
from ..data import InstructionDataset, iterate_eval, tokenize_instruction, trim_instruction_batch
from ..generate import generate
from ..model import GPT
from ..prompts import expected_response
from ..tokenizer import Tokenizer
from .general_knowledge import markdown_rows
from .language_model import language_model_metrics
from .text_overlap import corpus_bleu, mean_rouge_l

# Templates whose end-of-turn marker is a token of its own (when the vocabulary has it).
END_OF_TURN = {"chatml": "<|im_end|>", "phi3": "<|end|>"}


def normalize(text: str) -> str:
    """Exact match ignores case and how whitespace is laid out."""
    return " ".join(text.lower().split())


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Where an answer ends: the tokenizer's end-of-turn id, plus the template's marker when it is one token."""
    ids = {tokenizer.eot_id}
    marker = END_OF_TURN.get(template)
    if marker in tokenizer.special_tokens:
        ids.add(tokenizer.special_tokens[marker])
    return sorted(ids)


def answer_all(model: GPT, tokenizer: Tokenizer, records: list[dict[str, Any]], template: str, *,
               max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to every record's prompt, in batches (the KV cache handles uneven prompt lengths).

    A prompt too long for the context keeps its last tokens, leaving room for the answer.
    """
    eos = stop_ids(tokenizer, template)
    room = model.config.context_length - max_new_tokens
    prompts = [tokenize_instruction(record, template, tokenizer)[0][-room:] for record in records]
    answers = []
    for first in tqdm(range(0, len(prompts), batch_size), desc="answering", dynamic_ncols=True):
        batch = prompts[first:first + batch_size]
        outputs = generate(model, batch, max_new_tokens, temperature=0.0, eos_id=eos)
        for prompt, output in zip(batch, outputs):
            answers.append(tokenizer.decode([t for t in output[len(prompt):] if t not in eos]))
    return answers


def reference_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after `normalize`), corpus BLEU (0-100) and mean ROUGE-L (0-1) of answers against references."""
    hits = [normalize(answer) == normalize(reference) for answer, reference in zip(answers, references, strict=True)]
    return {"exact_match": sum(hits) / len(hits), "bleu": corpus_bleu(answers, references),
            "rouge_l": mean_rouge_l(answers, references)}


def score(records: list[dict[str, Any]], answers: list[str], response_loss: float) -> dict[str, Any]:
    """Exact match, BLEU and ROUGE-L overall and per task family (a record's `task` field), and the response loss."""
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for record, answer in zip(records, answers):
        task_answers, task_references = groups[record.get("task", "all")]
        task_answers.append(answer)
        task_references.append(expected_response(record))
    overall = reference_scores(answers, [expected_response(record) for record in records])
    per_task = {task: reference_scores(*pairs) for task, pairs in sorted(groups.items())}
    return {**overall,
            "per_task": {task: scores["exact_match"] for task, scores in per_task.items()},
            "per_task_bleu": {task: scores["bleu"] for task, scores in per_task.items()},
            "per_task_rouge_l": {task: scores["rouge_l"] for task, scores in per_task.items()},
            "response_loss": response_loss, "examples": len(answers)}


def evaluate_split(
    model: GPT, tokenizer: Tokenizer, records: list[dict[str, Any]], responses: InstructionDataset, template: str, *,
    max_new_tokens: int, batch_size: int, device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Answers to `records` and their scores: exact match, and the mean loss of the reference `responses`."""
    model.eval()
    with autocast or contextlib.nullcontext():
        answers = answer_all(model, tokenizer, records, template, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
        batches = (trim_instruction_batch(b)[:2] for b in iterate_eval(responses, batch_size))
        loss = language_model_metrics(model, batches, device)["loss"]
    return score(records, answers, loss), answers


def answer_rows(records: list[dict[str, Any]], before: list[str], after: list[str]) -> list[dict[str, Any]]:
    """One row per test record for responses.jsonl: its prompt, the expected answer, and both answers."""
    return [{"task": r.get("task", "all"), "instruction": r.get("instruction", ""), "input": r.get("input", ""),
             "expected": expected_response(r), "before": b, "after": a}
            for r, b, a in zip(records, before, after)]


def write_reports(out_dir: Path, before: dict[str, Any], after: dict[str, Any], rows: list[dict[str, Any]],
                  run: dict[str, Any]) -> None:
    """report.json, report.md (before | after | change, and one example answer per task), responses.jsonl.

    Each file is written atomically. `run` describes the run (model, trainable, template, mask_prompt, ...).
    """
    report = {"before": before, "after": after, **run}
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "responses.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lines = ["# Instruction tuning: before and after", "",
             f"Model: {run['model']}; trained: {run['trainable']}; template: {run['template']}; "
             f"prompt masked: {run['mask_prompt']}.", "",
             "| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]

    def row(name: str, a: float, b: float) -> None:
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")

    for name, metric, per_task in [("exact match", "exact_match", "per_task"), ("BLEU", "bleu", "per_task_bleu"),
                                   ("ROUGE-L", "rouge_l", "per_task_rouge_l")]:
        row(f"{name} (all)", before[metric], after[metric])
        for task in after[per_task]:
            row(f"{name}: {task}", before[per_task].get(task, 0.0), after[per_task][task])
    row("response loss", before["response_loss"], after["response_loss"])
    if "mmlu" in after:  # the fixed MMLU questions of general_knowledge.py
        lines += markdown_rows(before["mmlu"], after["mmlu"])
    lines += ["", "## Examples", "", "| task | prompt | expected | before | after |", "| --- | --- | --- | --- | --- |"]
    shown: set[str] = set()
    for r in rows:
        if r["task"] in shown:
            continue
        shown.add(r["task"])
        cells = [r["task"], (r["instruction"] + " " + r.get("input", "")).strip()[:80], r["expected"], r["before"],
                 r["after"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    write_text(out_dir / "report.md", "\n".join(lines) + "\n")
