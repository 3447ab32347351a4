"""The model-using verbs: generate, chat, evaluate (sliding-window perplexity, batch prompts), the verb table,
and the argument types every verb checks its values with (gpt.cli_args)."""

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from gpt import cli_args
from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.evaluate import sliding_window_loss, text_metrics
from gpt.generate import generate
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50257, context_length=64, d_model=32, n_layer=2, n_head=2)).eval()


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, tiny_model, tokenizer="gpt2", step=0)
    return path


def run_verb(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=120)


def reference_loss(model: GPT, ids: list[int], window: int, stride: int) -> float:
    """Score each target once, by the first window (in start order) that covers it and has not scored it."""
    scored, losses = set(), []
    start = 0
    while True:
        chunk = ids[start:start + window + 1]
        logits = model(torch.tensor([chunk[:-1]]))[0]
        for offset in range(len(chunk) - 1):
            target_index = start + offset + 1
            if target_index not in scored:
                scored.add(target_index)
                losses.append(F.cross_entropy(logits[offset], torch.tensor(chunk[offset + 1])).item())
        if start + window >= len(ids) - 1:
            break
        start += stride
    assert scored == set(range(1, len(ids)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("window, stride", [(64, 64), (16, 16), (16, 5), (10, 7)])
def test_sliding_window_loss_scores_every_token_once(tiny_model, window, stride):
    ids = torch.randint(0, 50257, (53,), generator=torch.Generator().manual_seed(1)).tolist()
    loss, count = sliding_window_loss(tiny_model, ids, window, stride, batch_size=3)
    assert count == 52
    assert math.isclose(loss, reference_loss(tiny_model, ids, window, stride), rel_tol=1e-5)


def test_sliding_window_loss_equals_full_forward_when_the_text_fits(tiny_model):
    ids = list(range(100, 140))
    loss, _ = sliding_window_loss(tiny_model, ids, window=64, stride=32)
    logits = tiny_model(torch.tensor([ids[:-1]]))[0]
    expected = F.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert math.isclose(loss, expected, rel_tol=1e-5)


@pytest.mark.parametrize("window, stride", [(64, 32), (16, 8)])
def test_bits_per_byte_is_the_scored_tokens_loss_over_their_bytes(tiny_model, window, stride):
    text = "東京 naïve Zürich — ¿Qué? " * 3  # the first GPT-2 token is 2 of the 3 bytes of 東
    tokenizer = get_tokenizer("gpt2")
    ids = tokenizer.encode(text)
    first_token_bytes = tokenizer.decode_bytes(ids[:1])
    assert first_token_bytes == "東".encode()[:2]
    metrics = text_metrics(tiny_model, tokenizer, text, window, stride)
    scored_bytes = len(text.encode("utf-8")) - len(first_token_bytes)
    total_nats = reference_loss(tiny_model, ids, window, stride) * (len(ids) - 1)
    assert (metrics["tokens"], metrics["scored_tokens"], metrics["scored_bytes"]) == (len(ids), len(ids) - 1,
                                                                                      scored_bytes)
    assert math.isclose(metrics["bits_per_byte"], total_nats / (math.log(2) * scored_bytes), rel_tol=1e-5)
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)


def test_evaluate_text_and_prompts(checkpoint, tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 3)
    tokenizer = get_tokenizer("gpt2")
    hello = tokenizer.encode("Hello")
    hello_reply = tokenizer.decode([t for t in generate(tiny_model, [hello], 5, eos_id=tokenizer.eot_id)[0][len(hello):]
                                    if t != tokenizer.eot_id])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello", "reference": hello_reply}) + "\n\n"
                       + json.dumps({"prompt": "Once upon a time", "id": 7, "reference": "there was a king."}) + "\n"
                       + json.dumps({"prompt": "No reference"}) + "\n")
    out = tmp_path / "responses.jsonl"
    done = run_verb("evaluate", "--checkpoint", str(checkpoint), "--text", str(text), "--prompts", str(prompts),
                    "--out", str(out), "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    metrics = json.loads(lines[0])
    ids = tokenizer.encode(text.read_text())  # the tokenizer is tested against tiktoken elsewhere
    assert metrics["tokens"] == len(ids) and (metrics["window"], metrics["stride"]) == (64, 32)
    loss = reference_loss(tiny_model, ids, 64, 32)
    assert abs(metrics["loss"] - loss) < 1e-4  # printed to 4 decimals
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-3)
    scored_bytes = len(text.read_bytes()) - len(b"It")  # the first token, "It", is not predicted
    assert tokenizer.decode(ids[:1]) == "It" and metrics["scored_bytes"] == scored_bytes
    expected_bpb = loss * (len(ids) - 1) / (math.log(2) * scored_bytes)
    assert abs(metrics["bits_per_byte"] - expected_bpb) < 1e-4  # printed to 4 decimals
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [None, 7, None] and all(isinstance(r["response"], str) for r in rows)
    assert rows[0]["response"] == hello_reply
    scores = json.loads(lines[-1])  # of the two prompts with a reference, scored by sacrebleu and rouge-score
    answers, references = [rows[0]["response"], rows[1]["response"]], [hello_reply, "there was a king."]
    rouge = rouge_scorer.RougeScorer(["rougeL"])
    assert scores["references"] == 2 and scores["exact_match"] == 0.5
    assert abs(scores["bleu"] - sacrebleu.corpus_bleu(answers, [references]).score) < 1e-4  # printed to 4 decimals
    rouge_l = sum(rouge.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)) / 2
    assert abs(scores["rouge_l"] - rouge_l) < 1e-4


def test_evaluate_bad_prompts_line_names_file_and_line(checkpoint, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    done = run_verb("evaluate", "--checkpoint", str(checkpoint), "--prompts", str(prompts))
    assert done.returncode == 2 and re.search(r"bad\.jsonl, line 2, column \d+: not valid JSON", done.stderr)
    assert "Traceback" not in done.stderr


def test_generate_greedy_matches_library(checkpoint, tiny_model):
    from gpt.generate import generate

    done = run_verb("generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--temperature", "0",
                    "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    tok = get_tokenizer("gpt2")
    expected = tok.decode(generate(tiny_model, torch.tensor(tok.encode("Hello")), max_new_tokens=8).tolist())
    assert done.stdout.rstrip("\n") == expected


def greedy_reply(model: GPT, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """What the chat verb should answer: greedy tokens after the whole conversation, up to end-of-text."""
    from gpt.generate import generate
    from gpt.prompts import chat_prompt

    prompt = tokenizer.encode(chat_prompt(messages, tokenizer), allowed_special="all")
    new = generate(model, [prompt], max_new_tokens, eos_id=tokenizer.eot_id)[0][len(prompt):]
    return tokenizer.decode([t for t in new if t != tokenizer.eot_id])


def test_chat_keeps_the_conversation_and_exits_on_end_of_input(checkpoint, tiny_model):
    done = run_verb("chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "4", stdin="hi\nand again\n")
    assert done.returncode == 0, done.stderr
    tokenizer, messages, expected = get_tokenizer("gpt2"), [], ""
    for line in ("hi", "and again"):
        messages.append({"role": "user", "content": line})
        reply = greedy_reply(tiny_model, tokenizer, messages, 4)
        messages.append({"role": "assistant", "content": reply})
        expected += f"you> bot> {reply}\n"
    assert done.stdout == expected + "you> \n"
    # The second reply depends on the first turn: without it the model would answer otherwise.
    assert greedy_reply(tiny_model, tokenizer, [{"role": "user", "content": "and again"}], 4) != reply


def test_unknown_verb_and_missing_model_are_clear_errors(tmp_path):
    done = run_verb("trian")
    assert done.returncode == 2 and "unknown verb 'trian'" in done.stderr
    done = run_verb("generate", "--model", str(tmp_path / "missing.gguf"))
    assert done.returncode == 2 and "missing.gguf" in done.stderr and "Traceback" not in done.stderr


def test_model_vocab_smaller_than_tokenizer_is_rejected(tmp_path):
    small = GPT(ModelConfig(vocab_size=1000, context_length=16, d_model=16, n_layer=1, n_head=2))
    save_checkpoint(tmp_path / "small.pt", small, tokenizer="gpt2")
    done = run_verb("generate", "--checkpoint", str(tmp_path / "small.pt"))
    assert done.returncode == 2 and "the tokenizer has 50257 tokens but the model only 1000" in done.stderr


# ----------------------------------------------------------------------------
# gpt.cli_args: values checked as argparse reads them
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("parse, text, expected", [
    (cli_args.positive_int, "3", 3),
    (cli_args.non_negative_int, "0", 0),
    (cli_args.int_at_least(2), "2", 2),
    (cli_args.seed, "4294967295", 4294967295),
    (cli_args.port, "65535", 65535),
    (cli_args.non_negative_float, "0", 0.0),
    (cli_args.probability, "1", 1.0),
    (cli_args.probability, "1e-3", 0.001),
    (cli_args.fraction, "0", 0.0),
    (cli_args.non_empty_text, " ", " "),
])
def test_argument_types_accept_good_values(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("parse, text, message", [
    (cli_args.positive_int, "0", "must be at least 1, got 0"),
    (cli_args.positive_int, "2.5", "expected an integer, got '2.5'"),
    (cli_args.non_negative_int, "-1", "must be at least 0, got -1"),
    (cli_args.int_at_least(2), "1", "must be at least 2, got 1"),
    (cli_args.seed, "4294967296", "must be below 2**32, got 4294967296"),
    (cli_args.port, "65536", "must be at most 65535, got 65536"),
    (cli_args.port, "0", "must be at least 1, got 0"),
    (cli_args.non_negative_float, "-0.5", "must not be negative, got -0.5"),
    (cli_args.non_negative_float, "inf", "must be a finite number, got 'inf'"),
    (cli_args.probability, "0", "must be in (0, 1], got 0"),
    (cli_args.probability, "1.01", "must be in (0, 1], got 1.01"),
    (cli_args.probability, "nan", "must be a finite number, got 'nan'"),
    (cli_args.probability, "half", "expected a number, got 'half'"),
    (cli_args.fraction, "1", "must be in [0, 1), got 1"),
    (cli_args.non_empty_text, "", "must not be empty"),
])
def test_argument_types_refuse_bad_values(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse(text)


def test_path_argument_types(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    assert cli_args.existing_file(str(tmp_path / "file")) == tmp_path / "file"
    assert cli_args.output_file(str(tmp_path / "file")) == tmp_path / "file"  # an existing file may be replaced
    assert cli_args.output_file(str(tmp_path / "new" / "deeper" / "out.json"))  # missing folders can be made
    assert cli_args.output_folder(str(tmp_path / "folder")) == tmp_path / "folder"
    assert cli_args.output_folder(str(tmp_path / "new" / "tokens"))
    refused = [
        (cli_args.existing_file, tmp_path / "folder", "is a folder, not a file"),
        (cli_args.existing_file, tmp_path / "missing", "missing: no such file"),
        (cli_args.output_file, tmp_path / "folder", "folder is a folder; give a file name"),
        (cli_args.output_file, tmp_path / "file" / "out.json", "file is a file, so no folder can be made there"),
        (cli_args.output_folder, tmp_path / "file", "file is a file, not a folder"),
        (cli_args.output_folder, tmp_path / "file" / "a" / "b", "file is a file, so no folder can be made there"),
    ]
    for parse, path, message in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # checking created nothing
