"""Instruction data (gpt.data.instruct): the collate rules (shift, masking, padding, truncation),
the [data] section of finetune_instruct.py, and `split_records`.

Expected values are derived here from the inputs, by hand (the count spelled out) or with plain Python.
"""

from __future__ import annotations

import random
import re

import pytest

from gpt.data import InstructDataConfig, InstructionBatchLoader, InstructionDataset, split_records, tokenize_instruction
from gpt.errors import ConfigError, UserError
from gpt.tokenizer import get_tokenizer

TOK = get_tokenizer("gpt2")
RECORD = {"instruction": "Sort these words.", "input": "pear apple", "output": "apple, pear"}


def test_targets_are_shifted_and_only_the_response_counts_when_masked():
    prompt_ids, response_ids = tokenize_instruction(RECORD, "alpaca", TOK)
    assert TOK.decode(response_ids) == "apple, pear<|endoftext|>"  # the end marker is a target: the model learns to stop
    ids = prompt_ids + response_ids
    masked = InstructionDataset([(prompt_ids, response_ids)], max_length=200, mask_prompt=True)
    unmasked = InstructionDataset([(prompt_ids, response_ids)], max_length=200, mask_prompt=False)
    inputs, targets, length = masked[0]
    assert inputs.tolist() == ids[:-1] and int(length) == len(ids) - 1
    counted = [t for t in targets.tolist() if t != -100]
    assert counted == response_ids  # exactly the response and its end marker
    assert unmasked[0][1].tolist() == ids[1:]


def test_padding_is_ignored_and_batches_trim_to_the_longest():
    short = tokenize_instruction({"instruction": "Hi", "output": "ok"}, "chatml", TOK)
    long = tokenize_instruction(RECORD, "chatml", TOK)
    dataset = InstructionDataset([short, long], max_length=200, mask_prompt=False)
    inputs, targets, lengths = InstructionBatchLoader(dataset, 2, shuffle=False).next_batch()
    assert inputs.shape == targets.shape == (2, len(long[0]) + len(long[1]) - 1)
    pad = int(lengths[0])
    assert (targets[0, pad:] == -100).all() and (targets[0, :pad] != -100).all()


def test_long_records_lose_prompt_from_the_left_or_are_dropped_and_counted():
    prompt_ids, response_ids = [1] * 50 + [2], [3, 4, 5]
    cut = InstructionDataset([(prompt_ids, response_ids)], max_length=10, mask_prompt=True)
    assert cut.stats.prompt_truncated == 1 and int(cut.lengths[0]) == 10
    assert cut[0][0].tolist()[-3:] == [2, 3, 4]  # the end of the prompt and the response survive
    with pytest.raises(UserError, match="no instruction record fits in 2 tokens"):
        InstructionDataset([(prompt_ids, response_ids)], max_length=2, mask_prompt=True)
    mixed = InstructionDataset([(prompt_ids, response_ids), ([1], list(range(20)))], max_length=10, mask_prompt=True)
    assert (mixed.stats.kept, mixed.stats.dropped_too_long) == (1, 1)


# ----------------------------------------------------------------------------
# The [data] section and split_records
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"template": "vicuna"}, "data.template: unknown template 'vicuna'; known: "),
    ({"max_length": 7}, "data.max_length: must be at least 8, got 7"),
    ({"eval_batch_size": 0}, "data.eval_batch_size: must be at least 1, got 0"),
    ({"test_fraction": -0.1}, "data.test_fraction: must be in [0, 1), got -0.1"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction (0.5) and data.test_fraction (0.5) must sum"),
])
def test_data_config_checks_its_fields(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        InstructDataConfig(**fields)


def records(n: int, splits: list[str] | None = None) -> list[dict]:
    """`n` distinct records, with the given `split` fields when `splits` is given."""
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(n)]
    for row, split in zip(rows, splits or []):
        row["split"] = split
    return rows


def test_split_records_follows_the_records_own_splits():
    rows = records(6, ["train", "test", "val", "train", "val", "train"])
    splits = split_records(rows, InstructDataConfig(path="r.jsonl", seed=3))  # the seed plays no part here
    assert splits == {name: [r for r in rows if r["split"] == name] for name in ("train", "val", "test")}


def test_split_records_refuses_an_unknown_split_name():
    rows = records(4, ["train", "val", "dev", "test"])
    with pytest.raises(UserError, match=re.escape("r.jsonl, record 2: split 'dev' is not train, val or test")):
        split_records(rows, InstructDataConfig(path="r.jsonl"))


def test_split_records_draws_a_seeded_split_when_some_record_has_none():
    rows = records(20, ["train"] * 19)  # the last record has no split field: all are split at random
    cfg = InstructDataConfig(path="r.jsonl", val_fraction=0.05, test_fraction=0.1, seed=7)
    splits = split_records(rows, cfg)
    # test: max(1, round(20 * 0.1)) = 2 records, val: max(1, round(20 * 0.05)) = 1, train: the other 17,
    # taken in that order from the record indices shuffled by random.Random(seed).
    order = list(range(20))
    random.Random(7).shuffle(order)
    assert splits == {"test": [rows[i] for i in order[:2]], "val": [rows[i] for i in order[2:3]],
                      "train": [rows[i] for i in order[3:]]}
    assert sorted(map(str, sum(splits.values(), []))) == sorted(map(str, rows))  # disjoint, nothing lost
    assert split_records(rows, cfg) == splits
    other_seeds = [split_records(rows, InstructDataConfig(path="r.jsonl", seed=seed)) for seed in range(8, 12)]
    assert any(other["test"] != splits["test"] for other in other_seeds)


def test_split_records_refuses_an_empty_split():
    with pytest.raises(UserError, match=re.escape("r.jsonl: the val split is empty: too few records")):
        split_records(records(3, ["train", "test", "train"]), InstructDataConfig(path="r.jsonl"))
    # Two records without splits: one goes to test and one to val (each at least one), none is left to train.
    with pytest.raises(UserError, match=re.escape("r.jsonl: the train split is empty: too few records")):
        split_records(records(2), InstructDataConfig(path="r.jsonl"))
