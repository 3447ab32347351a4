"""Instruction tuning: finetune_instruct.py end to end (the data and its collate rules: test_instruct_data.py)."""

import json
from pathlib import Path

import pytest

import finetune_instruct
from gpt.errors import UserError


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
        ('{"instruction": "x", "output": "y"}\n{"instruction": \n', r"line 2, column \d+: not valid JSON"),
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
