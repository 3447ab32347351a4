"""Instruction records in, prompt + response batches with the loss on the response out.

    records = read_instruction_records("data/instructions.json")           # gpt.prompts
    splits = split_records(records, InstructDataConfig())                   # the records' own splits, or a seeded one
    dataset = InstructionDataset.from_records(splits["train"], "model", tokenizer, max_length=256, mask_prompt=True)
    loader = InstructionBatchLoader(dataset, batch_size=8, seed=0)
    inputs, targets, lengths = loader.next_batch()   # (B, T), (B, T) with -100 where no loss, (B,)

A sequence is prompt + response + the template's end-of-turn marker, tokenized as
two parts by `tokenize_instruction` (the prompt exactly as generation will see it,
formatted by `gpt.prompts.format_example`, then the rest). Targets are the sequence
shifted by one; padding gets -100, and with `mask_prompt` the prompt's own tokens do
too, so the loss falls on the response and on the end marker, which teaches the
model where to stop. `InstructDataConfig` is the [data] section of finetune_instruct.py.
"""

from __future__ import annotations

import random
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import Section
from ..errors import ConfigError, UserError
from ..prompts import TEMPLATES, format_example
from ..tokenizer import Tokenizer

from .loader import BatchLoader


@dataclass
class InstructionStats:
    """What tokenizing a set of records did: kept, prompts cut from the left, records dropped."""

    records: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    dropped_too_long: int = 0


def tokenize_instruction(record: dict[str, Any], template: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the response ids end with the template's end-of-turn marker."""
    prompt, full = format_example(record, template, tokenizer)
    return (tokenizer.encode(prompt, allowed_special="all"),
            tokenizer.encode(full[len(prompt):], allowed_special="all"))


class InstructionDataset(Dataset):
    """Tokenized instruction records, right-padded to the longest; item i is (inputs, targets, length).

    `max_length` bounds the model's input (inputs are the sequence minus its last token).
    A record that is too long loses prompt tokens from the left; one whose response alone
    does not fit is dropped. Neither happens silently: `stats` counts both.
    """

    def __init__(self, sequences: Sequence[tuple[list[int], list[int]]], max_length: int, mask_prompt: bool,
                 pad_id: int = 0) -> None:
        self.stats = InstructionStats(records=len(sequences))
        self.mask_prompt = mask_prompt
        kept: list[tuple[list[int], int]] = []  # (ids, prompt length)
        for prompt_ids, response_ids in sequences:
            room = max_length + 1 - len(response_ids)  # tokens left for the prompt
            if room < 1:
                self.stats.dropped_too_long += 1
                continue
            if len(prompt_ids) > room:
                self.stats.prompt_truncated += 1
                prompt_ids = prompt_ids[-room:]
            kept.append((prompt_ids + response_ids, len(prompt_ids)))
        self.stats.kept = len(kept)
        if not kept:
            raise UserError(f"no instruction record fits in {max_length} tokens "
                            f"({self.stats.dropped_too_long} dropped as too long)")
        width = max(len(ids) for ids, _ in kept) - 1
        self.inputs = torch.full((len(kept), width), pad_id, dtype=torch.int64)  # (N, width)
        self.targets = torch.full((len(kept), width), -100, dtype=torch.int64)  # (N, width)
        self.lengths = torch.tensor([len(ids) - 1 for ids, _ in kept], dtype=torch.int64)  # (N,)
        for row, (ids, prompt_length) in enumerate(kept):
            sequence = torch.as_tensor(ids, dtype=torch.int64)
            self.inputs[row, :len(ids) - 1] = sequence[:-1]
            self.targets[row, :len(ids) - 1] = sequence[1:]
            if mask_prompt:  # targets 0 .. prompt_length-2 predict prompt tokens 1 .. prompt_length-1
                self.targets[row, :prompt_length - 1] = -100

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], template: str, tokenizer: Tokenizer, max_length: int,
                     mask_prompt: bool) -> InstructionDataset:
        pad_id = tokenizer.padding_id
        sequences = [tokenize_instruction(record, template, tokenizer) for record in records]
        return cls(sequences, max_length, mask_prompt, pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index], self.lengths[index]


def trim_instruction_batch(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, lengths) -> inputs and targets cut to the batch's longest sequence."""
    inputs, targets, lengths = batch
    width = int(lengths.max())
    return inputs[:, :width], targets[:, :width], lengths


class InstructionBatchLoader(BatchLoader):
    """`BatchLoader` over an InstructionDataset, each batch trimmed to its longest sequence."""

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return trim_instruction_batch(super().next_batch())


# ----------------------------------------------------------------------------
# The [data] section of finetune_instruct.py, and the split of the records
# ----------------------------------------------------------------------------


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
        for name, minimum in (("max_length", 8), ("max_new_tokens", 1), ("eval_batch_size", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"data.{name}: must be at least {minimum}, got {getattr(self, name)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) "
                              "must sum to less than 1")


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


def instruction_datasets(splits: dict[str, list[dict[str, Any]]], template: str, tokenizer: Tokenizer,
                         max_length: int, mask_prompt: bool) -> dict[str, InstructionDataset]:
    """Each split tokenized; `mask_prompt` applies to training only: validation and test losses are
    always over the response alone, whatever the training masks."""
    return {name: InstructionDataset.from_records(split, template, tokenizer, max_length,
                                                  mask_prompt=mask_prompt if name == "train" else True)
            for name, split in splits.items()}


def describe_dataset(name: str, dataset: InstructionDataset) -> str:
    """One line: records kept, prompts cut, records dropped, the longest sequence."""
    s = dataset.stats
    return (f"{name:<5} {s.kept:>5,} records (of {s.records:,}); prompts cut from the left: {s.prompt_truncated}; "
            f"dropped (response longer than max_length): {s.dropped_too_long}; "
            f"longest sequence {int(dataset.lengths.max())} tokens")
