"""Instruction-following evaluation: greedy answers, exact match per task family, the response loss, a report.

    answers = answer_all(model, tokenizer, records, "chatml", max_new_tokens=32, batch_size=16)
    scores = score(records, answers, response_loss)       # exact_match, per_task, response_loss
    write_reports(out_dir, before, after, rows, run)       # report.json, report.md, responses.jsonl

An answer matches when it equals the record's expected response after lower-casing and
collapsing whitespace (`normalize`). The response loss is the mean next-token loss of
the reference responses given their prompts (`language_model_metrics` over a masked
`InstructionDataset`): it moves even when no answer flips to exactly right.
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
from .language_model import language_model_metrics

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


def score(records: list[dict[str, Any]], answers: list[str], response_loss: float) -> dict[str, Any]:
    """Exact match overall and per task family (a record's `task` field), and the response loss."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers):
        hits[record.get("task", "all")].append(normalize(answer) == normalize(expected_response(record)))
    every = [hit for task_hits in hits.values() for hit in task_hits]
    return {"exact_match": sum(every) / len(every),
            "per_task": {task: sum(h) / len(h) for task, h in sorted(hits.items())},
            "response_loss": response_loss, "examples": len(every)}


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

    row("exact match (all)", before["exact_match"], after["exact_match"])
    for task in after["per_task"]:
        row(f"exact match: {task}", before["per_task"].get(task, 0.0), after["per_task"][task])
    row("response loss", before["response_loss"], after["response_loss"])
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
