"""Instruction-tune a model: prompt template, loss on the response, greedy answers scored by exact match.

    python finetune_instruct.py                          # SmolLM2-135M-Instruct + LoRA on data/instructions.json
    python finetune_instruct.py --train.trainable all    # full fine-tuning instead of LoRA
    python finetune_instruct.py --data.mask_prompt false # the loss on the prompt tokens too
    python finetune_instruct.py --model runs/pretrain-.../ --data.template alpaca --train.trainable all

`--model` takes a known name (fetched on first use, with a message), a GGUF file, a Hugging
Face folder, one of our checkpoints or run folders, or a preset for a model from scratch.
Records are Alpaca-style (`instruction`, optional `input`, `output`) or chat-style
(`messages`), in JSON or JSONL; a `split` field (train/val/test) keeps fixed splits,
otherwise a seeded split is drawn. Before training and after it, the model answers every
test prompt greedily (KV cache, stopping at the end-of-turn token); answers are scored by
exact match after normalizing case and whitespace, per task family and overall, next to
the mean loss of the reference responses. The run folder gets responses.jsonl (both
answers per test record), report.json (`before` and `after`) and report.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import atomic_write, load_model_state, save_checkpoint
from gpt.config import LoRAConfig, Section, TrainConfig, build_config, parse_overrides, read_toml, save_config_json
from gpt.data import InstructionBatchLoader, InstructionDataset, iterate_eval, tokenize_instruction, \
    trim_instruction_batch
from gpt.errors import ConfigError, UserError, run_cli
from gpt.evaluate import language_model_metrics
from gpt.generate import generate
from gpt.lora import apply_lora, count_parameters, merge_lora
from gpt.model import GPT
from gpt.prompts import TEMPLATES, expected_response, read_instruction_records
from gpt.tokenizer import Tokenizer
from gpt.train import Runtime, TrainTask, peak_memory_mib, setup_runtime, train
from gpt.weights import load_model_and_tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "instruct.toml"
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class InstructTrainConfig(TrainConfig):
    """The shared training fields, plus what trains."""

    trainable: str = field(default="lora", metadata={"help": "lora (adapters, see [lora]) | all (full fine-tuning)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainable not in ("lora", "all"):
            raise ConfigError(f"train.trainable: must be lora or all, got {self.trainable!r}")


@dataclass
class InstructDataConfig(Section):
    """The instruction records, their template, and how answers are generated for scoring."""

    section_name: typing.ClassVar[str] = "data"

    path: str = field(default="data/instructions.json", metadata={"help": "JSON or JSONL instruction records"})
    template: str = field(default="model", metadata={"help": "model (the model's chat template) | chatml | phi3 | alpaca"})
    mask_prompt: bool = field(default=True, metadata={"help": "no loss on prompt tokens (only response + end marker)"})
    max_length: int = field(default=256, metadata={"help": "longest input; longer prompts are cut from the left"})
    val_fraction: float = field(default=0.05, metadata={"help": "validation share when records carry no split"})
    test_fraction: float = field(default=0.1, metadata={"help": "test share when records carry no split"})
    seed: int = field(default=0, metadata={"help": "seed of the split when records carry no split"})
    max_new_tokens: int = field(default=48, metadata={"help": "longest generated answer"})
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.template not in TEMPLATES:
            raise ConfigError(f"data.template: unknown template {self.template!r}; known: {', '.join(TEMPLATES)}")
        if self.max_length < 8 or self.max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.max_length must be at least 8, data.max_new_tokens and data.eval_batch_size at least 1")


SECTIONS: dict[str, type[Section]] = {"train": InstructTrainConfig, "data": InstructDataConfig, "lora": LoRAConfig}


def parse_args(argv: list[str]) -> tuple[str, dict[str, Section]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any with --section.field value):\n"
        + "\n".join(line for cls in SECTIONS.values() for line in cls.field_help()),
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML config file (default: configs/instruct.toml)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="known name, .gguf, Hugging Face folder, checkpoint or "
                                                               "run folder, or a preset (default: %(default)s)")
    args, override_args = parser.parse_known_args(argv)
    toml = read_toml(args.config) if args.config else {}
    return args.model, build_config(SECTIONS, toml, parse_overrides(override_args))


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def split_records(records: list[dict[str, Any]], cfg: InstructDataConfig) -> dict[str, list[dict[str, Any]]]:
    """The records' own `split` fields when every record has one, else a seeded random split."""
    if all("split" in record for record in records):
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        for index, record in enumerate(records):
            if record["split"] not in splits:
                raise UserError(f"{cfg.path}, record {index}: split {record['split']!r} is not train, val or test")
            splits[record["split"]].append(record)
    else:
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        n_test = max(1, round(len(records) * cfg.test_fraction))
        n_val = max(1, round(len(records) * cfg.val_fraction))
        splits = {"test": [records[i] for i in order[:n_test]], "val": [records[i] for i in order[n_test:n_test + n_val]],
                  "train": [records[i] for i in order[n_test + n_val:]]}
    for name, split in splits.items():
        if not split:
            raise UserError(f"{cfg.path}: the {name} split is empty: too few records")
    return splits


# ----------------------------------------------------------------------------
# Scoring: greedy answers, exact match, response loss
# ----------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Exact match ignores case and how whitespace is laid out."""
    return " ".join(text.lower().split())


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Where an answer ends: the tokenizer's end-of-turn id, plus the template's marker when it is one token."""
    ids = {tokenizer.eot_id}
    marker = {"chatml": "<|im_end|>", "phi3": "<|end|>"}.get(template)
    if marker in tokenizer.special_tokens:
        ids.add(tokenizer.special_tokens[marker])
    return sorted(ids)


def answer_all(model: GPT, tokenizer: Tokenizer, records: list[dict[str, Any]], cfg: InstructDataConfig) -> list[str]:
    """Greedy answers to every record's prompt, in batches (the KV cache handles uneven prompt lengths)."""
    from tqdm.auto import tqdm

    eos = stop_ids(tokenizer, cfg.template)
    prompts = []
    for record in records:
        prompt_ids, _ = tokenize_instruction(record, cfg.template, tokenizer)
        room = model.config.context_length - cfg.max_new_tokens
        prompts.append(prompt_ids[-room:])
    answers = []
    for first in tqdm(range(0, len(prompts), cfg.eval_batch_size), desc="answering", dynamic_ncols=True):
        batch = prompts[first:first + cfg.eval_batch_size]
        outputs = generate(model, batch, cfg.max_new_tokens, temperature=0.0, eos_id=eos)
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


def evaluate_split(model: GPT, tokenizer: Tokenizer, records: list[dict[str, Any]], response_set: InstructionDataset,
                   cfg: InstructDataConfig, runtime: Runtime) -> tuple[dict[str, Any], list[str]]:
    """Answers to `records`, and the scores: exact match and the mean loss of the reference responses."""
    model.eval()
    with runtime.autocast():
        answers = answer_all(model, tokenizer, records, cfg)
        batches = (trim_instruction_batch(b)[:2] for b in iterate_eval(response_set, cfg.eval_batch_size))
        loss = language_model_metrics(model, batches, runtime.device)["loss"]
    return score(records, answers, loss), answers


def write_reports(out_dir: Path, before: dict[str, Any], after: dict[str, Any], rows: list[dict[str, Any]],
                  extra: dict[str, Any]) -> None:
    """report.json, report.md (before | after | change, and a few example answers), responses.jsonl; atomically."""
    report = {"before": before, "after": after, **extra}
    atomic_write(out_dir / "report.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    atomic_write(out_dir / "responses.jsonl",
                 lambda f: f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()))
    lines = ["# Instruction tuning: before and after", "",
             f"Model: {extra['model']}; trained: {extra['trainable']}; template: {extra['template']}; "
             f"prompt masked: {extra['mask_prompt']}.", "",
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
    atomic_write(out_dir / "report.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    source, config = parse_args(sys.argv[1:] if argv is None else argv)
    train_cfg, data_cfg, lora_cfg = config["train"], config["data"], config["lora"]
    started = time.perf_counter()
    runtime = setup_runtime(train_cfg, "instruct")
    loaded = load_model_and_tokenizer(source, seed=train_cfg.seed)
    model, tokenizer, tokenizer_name, description = loaded.model, loaded.tokenizer, loaded.tokenizer_name, loaded.description
    if data_cfg.max_length > model.config.context_length:
        raise UserError(f"data.max_length ({data_cfg.max_length}) exceeds the model's context length "
                        f"({model.config.context_length})")
    model.to(runtime.device)

    records = read_instruction_records(data_cfg.path)
    splits = split_records(records, data_cfg)
    # Validation and test losses are always over the response alone, whatever the training masks.
    datasets = {name: InstructionDataset.from_records(split, data_cfg.template, tokenizer, data_cfg.max_length,
                                                      mask_prompt=data_cfg.mask_prompt if name == "train" else True)
                for name, split in splits.items()}
    if runtime.is_main:
        save_config_json(config, runtime.out_dir / "config.json")
        print(f"model: {description}; {model.num_parameters():,} parameters; template {data_cfg.template}")
        for name, dataset in datasets.items():
            s = dataset.stats
            print(f"{name:<5} {s.kept:>5,} records (of {s.records:,}); prompts cut from the left: "
                  f"{s.prompt_truncated}; dropped (response longer than max_length): {s.dropped_too_long}; "
                  f"longest sequence {int(dataset.lengths.max())} tokens")

    before, before_answers = evaluate_split(model, tokenizer, splits["test"], datasets["test"], data_cfg, runtime)
    if runtime.is_main:
        print(f"before training: exact match {before['exact_match']:.3f}, response loss {before['response_loss']:.4f}")

    if train_cfg.trainable == "lora":
        apply_lora(model, **lora_cfg.settings())
    trainable, total = count_parameters(model)
    if runtime.is_main:
        print(f"training {train_cfg.trainable}: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    loader = InstructionBatchLoader(datasets["train"], train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                                    rank=runtime.rank, world_size=runtime.world_size, drop_last=False)
    val_set = datasets["val"]
    task = TrainTask(
        model=model,
        train_batches=loader,
        loss=lambda m, batch: m(batch[0], targets=batch[1]),
        evaluate=lambda m: language_model_metrics(
            m, (trim_instruction_batch(b)[:2] for b in iterate_eval(val_set, train_cfg.batch_size,
                                                                       max_batches=train_cfg.eval_batches)),
            runtime.device),
        batch_tokens=lambda batch: batch[0].numel(),  # every position is computed, padding included
        sequence_length=lambda batch: batch[0].shape[1],
        tokenizer=tokenizer_name,
    )
    result = train(task, train_cfg, runtime, {name: s.to_dict() for name, s in config.items()})
    if not runtime.is_main or result.interrupted:  # an interrupted run has said how to resume
        return 0

    # Score the best weights (by validation loss), with any adapters folded into plain weights.
    best = runtime.out_dir / "checkpoints" / "best.pt"
    if best.exists():
        load_model_state(model, torch.load(best, map_location=runtime.device, weights_only=True)["model"], best)
    if train_cfg.trainable == "lora":
        merge_lora(model)
    save_checkpoint(runtime.out_dir / "checkpoints" / "final.pt", model, tokenizer=tokenizer_name,
                    step=result.steps, template=data_cfg.template)
    after, after_answers = evaluate_split(model, tokenizer, splits["test"], datasets["test"], data_cfg, runtime)
    rows = [{"task": r.get("task", "all"), "instruction": r.get("instruction", ""), "input": r.get("input", ""),
             "expected": expected_response(r), "before": b, "after": a}
            for r, b, a in zip(splits["test"], before_answers, after_answers)]
    extra = {"model": description, "trainable": train_cfg.trainable, "trainable_parameters": trainable,
             "template": data_cfg.template, "mask_prompt": data_cfg.mask_prompt, "steps": result.steps,
             "wall_seconds": round(time.perf_counter() - started, 1), "peak_memory_mib": round(peak_memory_mib())}
    write_reports(runtime.out_dir, before, after, rows, extra)
    print(f"after training:  exact match {after['exact_match']:.3f} (before {before['exact_match']:.3f}), "
          f"response loss {after['response_loss']:.4f} (before {before['response_loss']:.4f})")
    print("per task: " + ", ".join(f"{t} {before['per_task'].get(t, 0):.2f}->{v:.2f}"
                                   for t, v in after["per_task"].items()))
    print(f"wall time {extra['wall_seconds']:.0f} s, peak memory {extra['peak_memory_mib']:,} MiB; "
          f"report: {runtime.out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
