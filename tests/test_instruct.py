"""Instruction tuning: finetune_instruct.py end to end (the data and its collate rules: test_instruct_data.py)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import finetune_instruct
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.prompts import format_example
from gpt.tokenizer import get_tokenizer


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
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    test_records = [r for r in map(json.loads, data.read_text().splitlines()) if r["split"] == "test"]
    assert [row["expected"] for row in rows] == [r["output"] for r in test_records]

    # The untrained model, rebuilt: the preset seeded with train.seed (1337), scored independently.
    torch.manual_seed(1337)
    model = GPT(ModelConfig.preset("tiny")).eval()
    tokenizer = get_tokenizer("gpt2")
    answers, losses = [], []
    for record in test_records:
        prompt, full = format_example(record, "alpaca", tokenizer)
        prompt_ids = tokenizer.encode(prompt, allowed_special="all")
        response_ids = tokenizer.encode(full[len(prompt):], allowed_special="all")
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + response_ids[:-1]]))[0]  # (T, V)
            losses += F.cross_entropy(logits[len(prompt_ids) - 1:], torch.tensor(response_ids), reduction="none").tolist()
            ids = prompt_ids
            for _ in range(4):  # greedy, stopping at the end of text
                next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
                if next_id == tokenizer.eot_id:
                    break
                ids = ids + [next_id]
        answers.append(tokenizer.decode(ids[len(prompt_ids):]))
    assert [row["before"] for row in rows] == answers
    assert abs(report["before"]["response_loss"] - sum(losses) / len(losses)) < 1e-4

    def normalized(text: str) -> str:
        return " ".join(text.lower().split())

    for side in ("before", "after"):
        hits = [normalized(row[side]) == normalized(row["expected"]) for row in rows]
        assert report[side]["exact_match"] == sum(hits) / len(hits) and report[side]["examples"] == 4
        assert report[side]["per_task"] == {"sort": sum(hits) / len(hits)}
    assert report["after"]["response_loss"] < report["before"]["response_loss"]
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
