"""Instruction tuning: the collate rules (shift, masking, padding, truncation) and finetune_instruct.py end to end."""

import json
from pathlib import Path

import pytest
import torch

import finetune_instruct
from gpt.data import InstructionBatchLoader, InstructionDataset, tokenize_instruction
from gpt.errors import UserError
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


def write_records(path: Path, n: int = 40) -> None:
    words = ["apple", "pear", "fig", "plum", "kiwi", "lime"]
    rows = []
    for i in range(n):
        pair = [words[i % 6], words[(i * 5 + 1) % 6]]
        split = "test" if i % 10 == 0 else "val" if i % 10 == 1 else "train"
        rows.append({"instruction": "Sort these words.", "input": " ".join(pair), "output": ", ".join(sorted(pair)),
                     "task": "sort", "split": split})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_script_end_to_end_on_a_tiny_model(tmp_path):
    data = tmp_path / "records.jsonl"
    write_records(data)
    out = tmp_path / "run"
    code = finetune_instruct.main([
        "--model", "tiny", "--data.path", str(data), "--data.template", "alpaca", "--train.trainable", "all",
        "--train.max_steps", "3", "--train.eval_interval", "3", "--train.batch_size", "4", "--train.dtype", "float32",
        "--data.max_new_tokens", "4", "--train.out_dir", str(out), "--train.warmup_steps", "1",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"exact_match", "per_task", "response_loss"} <= set(report[side])
        assert 0.0 <= report[side]["exact_match"] <= 1.0 and report[side]["examples"] == 4
    assert report["after"]["response_loss"] < report["before"]["response_loss"]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"expected", "before", "after"} <= set(rows[0])
    assert "| exact match (all) |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "x"}\n', r"line 1: missing field 'output'"),
        ('{"instruction": "x", "output": "y"}\n{"instruction": \n', r"line 2: invalid JSON"),
        ("", r"no instruction records"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(UserError, match=message):
        finetune_instruct.main(["--model", "tiny", "--data.path", str(data), "--train.out_dir", str(tmp_path / "r")])


def test_unknown_template_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="data.template: unknown template 'vicuna'"):
        finetune_instruct.main(["--model", "tiny", "--data.template", "vicuna", "--train.out_dir", str(tmp_path)])
