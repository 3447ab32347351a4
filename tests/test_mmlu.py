"""The MMLU task and `evaluate --task`: reading the data, the prompt, few-shot draws, the accuracy tables."""

import json

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.cli import evaluate_cli
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.evaluate import mmlu
from gpt.fetch import KNOWN_MODELS, resolve_model
from gpt.model import GPT


def row(subject: str, n: int, answer: str = "B") -> dict:
    return {"question": f"Question {n} about {subject}?", "answer_a": f"a{n}", "answer_b": f"b{n}",
            "answer_c": f"c{n}", "answer_d": f"d{n}", "correct_answer": answer, "topic": subject}


@pytest.fixture
def data(tmp_path):
    rows = [row("astronomy", n) for n in range(4)] + [row("philosophy", n, "D") for n in range(4, 7)]
    rows.insert(3, {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
                    "answer_d": "answer_d", "correct_answer": "answer", "topic": "astronomy"})  # a stray header
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def checkpoint(tmp_path):
    """A small random GPT-2-vocabulary model saved as our checkpoint."""
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, GPT(ModelConfig(vocab_size=50257, context_length=256, d_model=32, n_layer=1, n_head=2)),
                    tokenizer="gpt2")
    return path


def test_reading_skips_the_stray_header_and_says_where(data, capsys):
    questions = mmlu.read_mmlu(data)
    assert len(questions) == 7 and [q.answer for q in questions[:2]] == [1, 1]
    assert "skipped 1 header row(s) inside the data, line(s) [4]" in capsys.readouterr().err
    assert sum(len(subjects) for subjects in mmlu.CATEGORY_SUBJECTS.values()) == len(mmlu.CATEGORY_OF) == 57


def test_the_prompt_and_the_shots(data):
    questions = mmlu.read_mmlu(data)
    assert mmlu.prompt(questions[0], []) == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Question 0 about astronomy?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")
    assert mmlu.prompt(questions[0], [questions[1]]).count("Answer: B\n\n") == 1
    items, examples = mmlu.build_items(questions, questions, shots=2, seed=0, fmt="cloze")
    for question, item, lines in zip(questions, items, examples):
        assert question.line not in lines and len(lines) == 2  # never the question itself
        assert {q.subject for q in questions if q.line in lines} == {question.subject}
        assert item.choices == [f" {text}" for text in question.choices] and item.answer == question.answer
    again, _ = mmlu.build_items(questions, questions, shots=2, seed=0, fmt="cloze")
    assert [i.context for i in again] == [i.context for i in items]  # seeded
    # One draw per subject: three of astronomy's four questions (two examples and one to stand in for a
    # drawn question); the undrawn question and the one drawn last show the first two drawn.
    astronomy = [(q.line, shown) for q, shown in zip(questions, examples) if q.subject == "astronomy"]
    drawn_lines = {line for _, shown in astronomy for line in shown}
    assert len(drawn_lines) == 3 and sum(line not in drawn_lines for line, _ in astronomy) == 1
    first_two = next(shown for line, shown in astronomy if line not in drawn_lines)
    assert sum(shown == first_two for _, shown in astronomy) == 2
    with pytest.raises(UserError, match="--shots 3: subject 'philosophy' has only 2 other questions"):
        mmlu.build_items(questions, questions, shots=3, seed=0, fmt="mcf")


def test_a_two_shot_prompt_written_out(data):
    """The prompt lm-evaluation-harness builds, character for character: header, the shots with their answer
    letters, the question up to "Answer:"."""
    questions = mmlu.read_mmlu(data)
    assert mmlu.prompt(questions[0], [questions[2], questions[1]]) == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Question 2 about astronomy?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer: B\n\n"
        "Question 1 about astronomy?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
        "Question 0 about astronomy?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")
    items, examples = mmlu.build_items(questions[4:5], questions, shots=1, seed=0, fmt="mcf")
    shot = next(n for n in (5, 6) if questions[n].line == examples[0][0])  # the other philosophy question drawn
    assert items[0].context == (
        "The following are multiple choice questions (with answers) about philosophy.\n\n"
        f"Question {shot} about philosophy?\nA. a{shot}\nB. b{shot}\nC. c{shot}\nD. d{shot}\nAnswer: D\n\n"
        "Question 4 about philosophy?\nA. a4\nB. b4\nC. c4\nD. d4\nAnswer:")
    assert items[0].choices == [" A", " B", " C", " D"]


def test_evaluate_task_mmlu_reports_what_the_items_say(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "items.jsonl"
    assert evaluate_cli(["--checkpoint", str(checkpoint), "--task", "mmlu", "--data", str(data),
                         "--shots", "1", "--out", str(out), "--batch-size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["items"] == len(rows) == 7 and summary["shots"] == 1
    for subject in ("astronomy", "philosophy"):
        hits = [r["pred"] == r["answer"] for r in rows if r["subject"] == subject]
        assert summary["subjects"][subject] == {"accuracy": sum(hits) / len(hits), "questions": len(hits)}
    assert summary["categories"]["stem"] == summary["subjects"]["astronomy"]
    assert summary["categories"]["humanities"] == summary["subjects"]["philosophy"]
    assert summary["acc"] == sum(r["pred"] == r["answer"] for r in rows) / 7 == summary["overall"]["accuracy"]


def test_the_report_folder_holds_the_summary_its_tables_and_a_chart(data, checkpoint, tmp_path, capsys):
    report = tmp_path / "report"
    assert evaluate_cli(["--checkpoint", str(checkpoint), "--task", "mmlu", "--data", str(data),
                         "--out", str(tmp_path / "items.jsonl"), "--report", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((report / "report.json").read_text()) == printed
    markdown = (report / "report.md").read_text()
    for name, entry in [*printed["categories"].items(), *printed["subjects"].items()]:
        assert f"| {name} | {entry['accuracy']:.4f} | {entry['questions']} |" in markdown
    assert f"| acc | {printed['acc']:.4f} |" in markdown
    assert (report / "categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in report.iterdir()) == ["categories.png", "report.json", "report.md"]  # no temporaries


def test_task_mc_bad_lines_and_names(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"], "answer": 1}\n{"context": "x", "choices": ["a"], '
                   '"answer": 0}\n')
    with pytest.raises(UserError, match=r"mc.jsonl, line 2: expected"):
        evaluate_cli(["--preset", "tiny", "--task", "mc", "--data", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert KNOWN_MODELS["mmlu"].kind == "dataset"
    with pytest.raises(UserError, match="no such file or known model: 'mmlu'"):
        resolve_model("mmlu")  # a dataset, not a model


@pytest.mark.slow
def test_the_fetched_test_set_is_whole_and_every_subject_has_a_category(capsys):
    """Needs `python -m gpt fetch mmlu` (CI runs it): 14,042 questions in 57 subjects, the two stray header rows
    skipped, every subject in one of the four categories."""
    from gpt.fetch import cached_path

    path = cached_path("mmlu")
    if not path.is_file():
        pytest.fail(f"{path} is not cached: run `python -m gpt fetch mmlu` first", pytrace=False)
    questions = mmlu.read_mmlu(path)
    assert len(questions) == 14_042
    assert "line(s) [11777, 12794]" in capsys.readouterr().err
    assert {q.subject for q in questions} == set(mmlu.CATEGORY_OF)
