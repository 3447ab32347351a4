"""Instruction tuning: finetune_instruct.py end to end (the data and its collate rules: test_instruct_data.py)."""

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

import finetune_instruct
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.evaluate.instruction import score
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

    rouge = rouge_scorer.RougeScorer(["rougeL"])
    for side in ("before", "after"):
        hits = [normalized(row[side]) == normalized(row["expected"]) for row in rows]
        assert report[side]["exact_match"] == sum(hits) / len(hits) and report[side]["examples"] == 4
        assert report[side]["per_task"] == {"sort": sum(hits) / len(hits)}
        answers, references = [row[side] for row in rows], [row["expected"] for row in rows]
        bleu = sacrebleu.corpus_bleu(answers, [references]).score
        rouge_l = sum(rouge.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)) / len(rows)
        assert report[side]["bleu"] == pytest.approx(bleu) and report[side]["rouge_l"] == pytest.approx(rouge_l)
        assert report[side]["per_task_bleu"] == {"sort": pytest.approx(bleu)}
        assert report[side]["per_task_rouge_l"] == {"sort": pytest.approx(rouge_l)}
    assert report["after"]["response_loss"] < report["before"]["response_loss"]
    markdown = (out / "report.md").read_text()
    assert "| exact match (all) |" in markdown and "| BLEU: sort |" in markdown and "| ROUGE-L (all) |" in markdown


def test_scores_per_task_and_overall_equal_sacrebleu_and_rouge_score():
    records = [{"instruction": "i", "output": out, "task": task} for out, task in [
        ("The cat sat on the mat.", "copy"), ("A Tall Woman Sleeps.", "copy"), ("2024-03-05", "date"),
        ("March 5, 2024", "date"), ("spam", "label")]]
    answers = ["the cat sat on a mat.", "A tall woman  sleeps.", "2024-03-05", "5 March 2024", "ham"]
    scores = score(records, answers, response_loss=1.5)
    rouge = rouge_scorer.RougeScorer(["rougeL"])

    def expected(indices: list[int]) -> tuple[float, float, float]:
        hyps, refs = [answers[i] for i in indices], [records[i]["output"] for i in indices]
        rouge_l = sum(rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
        exact = sum(" ".join(h.lower().split()) == " ".join(r.lower().split()) for h, r in zip(hyps, refs))
        return exact / len(hyps), sacrebleu.corpus_bleu(hyps, [refs]).score, rouge_l

    assert (scores["exact_match"], scores["bleu"], scores["rouge_l"]) == pytest.approx(expected([0, 1, 2, 3, 4]))
    for task, indices in {"copy": [0, 1], "date": [2, 3], "label": [4]}.items():
        found = (scores["per_task"][task], scores["per_task_bleu"][task], scores["per_task_rouge_l"][task])
        assert found == pytest.approx(expected(indices))
    assert scores["per_task"] == {"copy": 0.5, "date": 0.5, "label": 0.0} and scores["bleu"] > 0
    assert (scores["response_loss"], scores["examples"]) == (1.5, 5)


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


def test_lora_on_an_int4_base(tmp_path):
    """train.quantize int4: training lowers the loss; the final checkpoint is float, its frozen layers the
    int4 weights (at most 16 levels in each group of 32 inputs)."""
    data = tmp_path / "records.jsonl"
    write_records(data)
    out = tmp_path / "run"
    assert finetune_instruct.main([
        "--model", "tiny", "--data.path", str(data), "--data.template", "alpaca", "--train.trainable", "lora",
        "--lora.targets", "q_proj,v_proj", "--train.quantize", "int4", "--train.lr", "3e-3",
        "--train.max_steps", "4", "--train.eval_interval", "4", "--train.batch_size", "4", "--train.dtype", "float32",
        "--data.max_new_tokens", "2", "--train.out_dir", str(out), "--train.warmup_steps", "1",
    ]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["response_loss"] < report["before"]["response_loss"]
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)["model"]
    frozen = final["blocks.0.mlp.up_proj.weight"]  # (1024, 256)
    levels = [len(group.unique()) for group in frozen.reshape(-1, 32)]
    assert max(levels) <= 16
