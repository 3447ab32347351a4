"""`--eval.mmlu N`: a fixed MMLU subset in the before/after reports of both fine-tuning scripts, scored
independently here from the saved weights (a plain forward and the argmax over the four letters)."""

import json
from collections import defaultdict

import pytest
import torch

import finetune_classifier
import finetune_instruct
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.classifier import GPTClassifier, load_classifier
from gpt.config import ModelConfig
from gpt.errors import ConfigError, UserError
from gpt.evaluate import general_knowledge, mmlu
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer

# subject -> answers of its questions, in file order (the file interleaves the subjects)
ANSWERS = {"astronomy": "ABC", "abstract algebra": "DA", "philosophy": "BCD", "marketing": "CB", "sociology": "A"}
CATEGORY = {"astronomy": "stem", "abstract algebra": "stem", "philosophy": "humanities", "marketing": "other",
            "sociology": "social sciences"}


@pytest.fixture
def mmlu_file(tmp_path):
    rows = []
    for n in range(3):
        for subject, answers in ANSWERS.items():
            if n < len(answers):
                rows.append({"question": f"Which {subject} fact is number {n}?", "answer_a": f"alpha {n}",
                             "answer_b": f"beta {n}", "answer_c": f"gamma {n}", "answer_d": f"delta {n}",
                             "correct_answer": answers[n], "topic": subject})
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_subset_is_fixed_and_spread_over_the_categories(mmlu_file):
    questions = mmlu.read_mmlu(mmlu_file)
    picked = general_knowledge.fixed_subset(questions, 8)
    # Round 0: the first question of each subject, the subjects taking turns by category (STEM, humanities,
    # social sciences, other; alphabetical within one); then round 1, while questions last.
    assert [(q.subject, q.question[-2]) for q in picked] == [
        ("abstract algebra", "0"), ("philosophy", "0"), ("sociology", "0"), ("marketing", "0"), ("astronomy", "0"),
        ("abstract algebra", "1"), ("philosophy", "1"), ("marketing", "1")]
    assert general_knowledge.fixed_subset(questions, 3) == picked[:3]
    assert len(general_knowledge.fixed_subset(questions, 99)) == len(questions) == 11


def test_the_file_is_checked_before_any_work(mmlu_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"eval\.mmlu 5: the MMLU questions .*mmlu\.jsonl do not exist; "
                                        r"run `python -m gpt fetch mmlu` first"):
        general_knowledge.load_subset(general_knowledge.EvalConfig(mmlu=5))
    with pytest.raises(UserError, match=r"eval\.mmlu 12: .*mmlu\.jsonl holds only 11 questions"):
        general_knowledge.load_subset(general_knowledge.EvalConfig(mmlu=12, mmlu_path=str(mmlu_file)))
    with pytest.raises(ConfigError, match=r"eval\.mmlu: must not be negative, got -1"):
        general_knowledge.EvalConfig(mmlu=-1)
    assert general_knowledge.load_subset(general_knowledge.EvalConfig()) is None
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"python -m gpt fetch mmlu"):
        finetune_classifier.main(["--eval.mmlu", "5", "--train.out_dir", str(run)])
    with pytest.raises(UserError, match=r"python -m gpt fetch mmlu"):
        finetune_instruct.main(["--model", "tiny", "--eval.mmlu", "5", "--train.out_dir", str(run)])
    assert not run.exists()


def test_the_original_head_reads_the_body_and_goes_away_after():
    for tied in (True, False):
        torch.manual_seed(0)
        body = GPT(ModelConfig(vocab_size=61, context_length=16, d_model=32, n_layer=1, n_head=2, tie_embeddings=tied))
        head = general_knowledge.original_head(body)
        expected_head = (body.tok_emb.weight if tied else body.lm_head.weight).detach().clone()
        classifier = GPTClassifier(body, 2)
        keys = set(classifier.state_dict())
        with torch.no_grad():
            classifier.gpt.tok_emb.weight.add_(1.0)  # fine-tuning moves the (tied) embedding; the head stays
            ids = torch.randint(0, 61, (2, 9))
            with general_knowledge.with_lm_head(classifier.gpt, head) as language_model:
                logits = language_model(ids)
            torch.testing.assert_close(logits, classifier.gpt.hidden_states(ids) @ expected_head.T)
        assert classifier.gpt.lm_head is None and set(classifier.state_dict()) == keys


# ----------------------------------------------------------------------------
# The scripts, checked against an independent scoring of the saved weights
# ----------------------------------------------------------------------------


def prompt(row: dict) -> str:
    """The standard 0-shot MMLU prompt, written out."""
    return (f"The following are multiple choice questions (with answers) about {row['topic']}.\n\n"
            f"{row['question']}\nA. {row['answer_a']}\nB. {row['answer_b']}\nC. {row['answer_c']}\n"
            f"D. {row['answer_d']}\nAnswer:")


def expected_accuracy(logits_of, mmlu_file, lines: list[int], context_length: int) -> dict:
    """Accuracy overall and per category: the letter with the largest logit after the prompt's last
    `context_length` tokens (the first on a tie), against the answer."""
    tokenizer = get_tokenizer("gpt2")
    letters = [tokenizer.encode(f" {letter}")[0] for letter in "ABCD"]
    rows = mmlu_file.read_text().splitlines()
    hits: dict[str, list[bool]] = defaultdict(list)
    for line in lines:
        row = json.loads(rows[line - 1])
        ids = tokenizer.encode(prompt(row))[-context_length:]
        with torch.no_grad():
            scores = logits_of(torch.tensor([ids]))[0, -1, letters].tolist()
        hits[CATEGORY[row["topic"]]].append("ABCD"[scores.index(max(scores))] == row["correct_answer"])
    every = [hit for group in hits.values() for hit in group]
    return {"overall": sum(every) / len(every), **{name: sum(h) / len(h) for name, h in hits.items()}}


def reported(scores: dict) -> dict:
    return {"overall": scores["overall"]["accuracy"],
            **{name: entry["accuracy"] for name, entry in scores["categories"].items()}}


def reload(path) -> GPT:
    state = load_checkpoint(path)
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def test_instruct_reports_mmlu_before_and_after(mmlu_file, tmp_path):
    torch.manual_seed(0)
    pretrained = GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=32, n_layer=1, n_head=2)).eval()
    save_checkpoint(tmp_path / "pre.pt", pretrained, tokenizer="gpt2")
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat.", "input": word, "output": word, "split": split}) + "\n"
                            for word, split in [("fig", "train"), ("kiwi", "train"), ("plum", "val"),
                                                ("lime", "test")]))
    out = tmp_path / "run"
    assert finetune_instruct.main([
        "--model", str(tmp_path / "pre.pt"), "--data.path", str(data), "--data.template", "alpaca",
        "--data.max_length", "64", "--data.max_new_tokens", "2", "--train.trainable", "all", "--train.max_steps", "3",
        "--train.eval_interval", "3", "--train.batch_size", "2", "--train.warmup_steps", "1", "--train.lr", "1e-2",
        "--train.dtype", "float32", "--train.device", "cpu", "--train.out_dir", str(out),
        "--eval.mmlu", "7", "--eval.mmlu_path", str(mmlu_file)]) == 0
    report = json.loads((out / "report.json").read_text())
    # The fixed seven: round 0 (five subjects), then abstract algebra and philosophy again (their file lines).
    assert report["mmlu_subset"]["lines"] == [2, 3, 5, 4, 1, 7, 8] and report["mmlu_subset"]["questions"] == 7
    after = reload(out / "checkpoints" / "final.pt")
    assert not torch.equal(after.blocks[0].mlp.up_proj.weight, pretrained.blocks[0].mlp.up_proj.weight)
    for side, model in (("before", pretrained), ("after", after)):
        assert reported(report[side]["mmlu"]) == expected_accuracy(model, mmlu_file, report["mmlu_subset"]["lines"], 64)
    markdown = (out / "report.md").read_text()
    overall = [report[side]["mmlu"]["overall"]["accuracy"] for side in ("before", "after")]
    assert f"| MMLU accuracy (7 questions) | {overall[0]:.3f} | {overall[1]:.3f} |" in markdown
    assert "| MMLU: humanities (2 questions) |" in markdown


def test_classifier_reports_mmlu_of_the_body_through_the_original_head(mmlu_file, tmp_path):
    torch.manual_seed(0)
    pretrained = GPT(ModelConfig(vocab_size=50257, context_length=32, d_model=32, n_layer=2, n_head=2)).eval()
    save_checkpoint(tmp_path / "pre" / "checkpoints" / "best.pt", pretrained, tokenizer="gpt2")
    data = tmp_path / "sms.tsv"
    data.write_text("".join(f"{'spam' if n % 3 == 0 else 'ham'}\t{'WIN cash' if n % 3 == 0 else 'see you'} {n}\n"
                            for n in range(60)))
    out = tmp_path / "run"
    assert finetune_classifier.main([
        "--model", str(tmp_path / "pre"), "--train.trainable", "all", "--train.max_steps", "2", "--train.lr", "1e-2",
        "--data.path", str(data), "--train.out_dir", str(out), "--classifier.max_length", "32",
        "--train.dtype", "float32", "--train.device", "cpu", "--train.eval_interval", "2",
        "--eval.mmlu", "11", "--eval.mmlu_path", str(mmlu_file)]) == 0
    report = json.loads((out / "report.json").read_text())
    lines = report["run"]["mmlu_subset"]["lines"]
    assert sorted(lines) == list(range(1, 12))
    classifier, _, _ = load_classifier(out)
    original = pretrained.tok_emb.weight.detach()  # tied: the pretrained LM head is the embedding matrix
    assert not torch.equal(classifier.gpt.tok_emb.weight, original)  # the body's embedding trained

    def fine_tuned_body(ids: torch.Tensor) -> torch.Tensor:
        return classifier.gpt.hidden_states(ids) @ original.T

    assert reported(report["before"]["mmlu"]) == expected_accuracy(pretrained, mmlu_file, lines, 32)
    assert reported(report["after"]["mmlu"]) == expected_accuracy(fine_tuned_body, mmlu_file, lines, 32)
    markdown = (out / "report.md").read_text()
    assert "## General knowledge: MMLU" in markdown and "| MMLU accuracy (11 questions) |" in markdown
