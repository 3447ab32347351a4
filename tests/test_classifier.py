"""Classifier fine-tuning: the class head and pooling, what trains, the script, `classify` (the data: test_classification_data.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_classifier
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.classifier import (
    GPTClassifier,
    classifier_info,
    classify_cli,
    classify_texts,
    decide,
    load_classifier,
    pool,
)
from gpt.config import ModelConfig
from gpt.data import ClassificationBatchLoader
from gpt.errors import ConfigError, UserError
from gpt.scripts import parse_trainable, set_trainable
from gpt.lora import count_parameters
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 61
LLAMA_STYLE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)


def tiny_classifier(pooling: str = "last", num_classes: int = 3, seed: int = 0, **overrides) -> GPTClassifier:
    config = ModelConfig(**{**dict(vocab_size=VOCAB, context_length=48, d_model=32, n_layer=2, n_head=4), **overrides})
    torch.manual_seed(seed)
    return GPTClassifier(GPT(config), num_classes, pooling).eval()


# ----------------------------------------------------------------------------
# Head and pooling
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("style", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
@pytest.mark.parametrize("attn_impl", ["manual", "sdpa"])
def test_prediction_does_not_depend_on_padding(pooling, style, attn_impl):
    model = tiny_classifier(pooling, attn_impl=attn_impl, **style)
    generator = torch.Generator().manual_seed(3)
    short = torch.randint(0, VOCAB, (5,), generator=generator)
    long = torch.randint(0, VOCAB, (40,), generator=generator)
    with torch.no_grad():
        alone = model(short[None], torch.tensor([5]))  # (1, C): no padding at all
        batch = torch.randint(0, VOCAB, (3, 40), generator=generator)  # padding of random ids, not one pad id
        batch[0, :5], batch[1], batch[2, :5] = short, long, short
        padded = model(batch, torch.tensor([5, 40, 5]))  # (3, C): the short text padded with 35 tokens
    assert alone.shape == (1, 3)
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded[2], alone[0], rtol=0, atol=1e-6)


def test_pooling_reads_only_real_tokens():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # (B, T, D)
    lengths = torch.tensor([2, 4])
    torch.testing.assert_close(pool(hidden, lengths, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, lengths, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def test_the_class_head_is_its_own_and_the_lm_head_is_gone():
    model = tiny_classifier(num_classes=2)
    assert model.head.weight.shape == (2, 32) and model.head.bias.shape == (2,)
    assert model.gpt.lm_head is None
    assert model.gpt.tok_emb.weight.shape == (VOCAB, 32)  # the tied embedding keeps its vocabulary rows
    keys = set(model.state_dict())
    assert {"head.weight", "head.bias"} <= keys and not any(key.startswith("gpt.lm_head") for key in keys)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        pooled = pool(model.gpt.hidden_states(ids), torch.tensor([7, 4]), "last")
        torch.testing.assert_close(model(ids, torch.tensor([7, 4])), pooled @ model.head.weight.T + model.head.bias)


def test_a_checkpoint_from_before_the_own_head_still_loads(tmp_path):
    """Classifier checkpoints once stored the class head as gpt.lm_head.*; they load into `head`."""
    model = tiny_classifier(num_classes=2)
    old_keys = {("gpt.lm_head." + key.removeprefix("head.") if key.startswith("head.") else key): tensor
                for key, tensor in model.state_dict().items()}

    class OldLayout(torch.nn.Module):  # what save_checkpoint needs: a config and a state_dict
        config = model.config

        def state_dict(self):
            return old_keys

    save_checkpoint(tmp_path / "old.pt", OldLayout(), tokenizer="gpt2",
                    classifier=classifier_info(["ham", "spam"], "last", 48, 0))
    loaded, info, _ = load_classifier(tmp_path / "old.pt")
    ids, lengths = torch.randint(0, VOCAB, (3, 9)), torch.tensor([9, 3, 5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, lengths), model(ids, lengths))
    assert info["labels"] == ["ham", "spam"]


def test_decide_takes_the_most_likely_class_or_the_threshold_inclusively():
    probabilities = np.array([[0.5, 0.5], [0.75, 0.25], [0.2, 0.8], [0.9, 0.1]])
    assert decide(probabilities).tolist() == [0, 0, 1, 0]  # a tie goes to the first class (argmax)
    # Class 1 when its probability is at least the threshold: 0.25 itself counts.
    assert decide(probabilities, threshold=0.25).tolist() == [1, 1, 1, 0]
    assert decide(probabilities, threshold=0.8).tolist() == [0, 0, 1, 0]
    three = np.array([[0.2, 0.3, 0.5]])
    assert decide(three, threshold=0.1).tolist() == [2]  # a threshold applies to two classes only


def test_what_trains_and_the_counts():
    def counts(spec: str, **lora) -> int:
        model = tiny_classifier(num_classes=2, **LLAMA_STYLE)
        set_trainable(model.gpt, spec, lora or None, head=model.head)
        return count_parameters(model)[0]

    model = tiny_classifier(num_classes=2, **LLAMA_STYLE)
    head = 32 * 2 + 2
    block = sum(p.numel() for p in model.gpt.blocks[-1].parameters())
    final_norm = sum(p.numel() for p in model.gpt.final_norm.parameters())
    assert counts("head") == head
    assert counts("last:1") == head + final_norm + block
    assert counts("last:2") == head + final_norm + 2 * block
    assert counts("all") == count_parameters(model)[1]
    # LoRA on q_proj (32 -> 32) and v_proj (32 -> 16, two kv heads of 8) of both blocks, rank 4:
    adapters = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert counts("lora", rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"]) == head + adapters


def test_last_n_beyond_the_depth_and_bad_specs():
    with pytest.raises(UserError, match=r"last:3 asks for the last 3 blocks, but the model has 2"):
        model = tiny_classifier()
        set_trainable(model.gpt, "last:3", head=model.head)
    for spec in ("last", "last:0", "last:x", "everything", "head:1"):
        with pytest.raises(ConfigError, match="train.trainable"):
            parse_trainable(spec)


# ----------------------------------------------------------------------------
# The script and the classify verb, on a tiny model and a synthetic data set
# ----------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TINY_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--model.dropout", "0", "--classifier.max_length", "32", "--train.batch_size", "8", "--train.lr", "3e-3",
    "--train.warmup_steps", "2", "--train.eval_interval", "4", "--train.log_interval", "1",
    "--train.dtype", "float32", "--train.device", "cpu",
]
SPAM_WORDS = ["WIN", "FREE", "prize", "claim", "cash", "urgent", "txt", "call", "now", "award"]
HAM_WORDS = ["see", "you", "at", "lunch", "home", "later", "love", "mum", "sorry", "ok"]


def synthetic_rows(n: int, seed: int = 0, labels: tuple[str, ...] = ("ham", "spam")) -> list[tuple[str, str]]:
    """`n` distinct (label, text) rows, 30% of the last label, each text made of its class's words."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = labels[-1] if rng.random() < 0.3 else rng.choice(labels[:-1])
        words = SPAM_WORDS if label == labels[-1] else HAM_WORDS
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if text not in seen:
            seen.add(text)
            rows.append((label, text))
    return rows


@pytest.fixture(scope="module")
def sms_like(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sms.tsv"
    rows = synthetic_rows(200)
    rows += rows[:10]  # duplicates, to be dropped before the split
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def run_script(out_dir: Path, data: Path, *extra: str) -> dict:
    args = [*TINY_RUN, "--data.path", str(data), "--train.out_dir", str(out_dir), *extra]
    assert finetune_classifier.main(args) == 0
    return json.loads((out_dir / "report.json").read_text())


def metrics(out_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_script_trains_reports_and_classify_reads_the_final_model(tmp_path, sms_like, capsys):
    report = run_script(tmp_path, sms_like, "--train.max_steps", "16")
    for name in ("before", "after"):
        expected = {"accuracy", "macro_f1", "per_class", "confusion_matrix", "roc_auc", "tuned_threshold"}
        assert expected <= set(report[name])
        assert set(report[name]["per_class"]) == {"ham", "spam"}
        assert np.sum(report[name]["confusion_matrix"]) == report["run"]["split_sizes"]["test"]
    assert report["after"]["accuracy"] > 0.9 and report["after"]["accuracy"] > report["before"]["accuracy"]
    assert report["run"]["split_sizes"] == {"train": 160, "val": 20, "test": 20}  # 200 distinct texts
    assert report["run"]["trainable_parameters"] == report["run"]["total_parameters"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| spam F1 |" in markdown and "Confusion matrix after" in markdown and "tuned on validation" in markdown
    val = metrics(tmp_path, "val")
    assert val[0]["step"] == 0 and val[-1]["loss"] < val[0]["loss"]

    final = load_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert final["classifier"]["labels"] == ["ham", "spam"] and final["classifier"]["threshold"] is not None
    model, info, tokenizer_name = load_classifier(tmp_path)
    texts = ["WIN FREE cash now claim", "see you at lunch mum"]
    probabilities = classify_texts(model, get_tokenizer(tokenizer_name), texts, info["pad_id"])
    assert probabilities.argmax(axis=1).tolist() == [1, 0]

    capsys.readouterr()
    texts_file = write(tmp_path / "texts.txt", "\n".join(texts) + "\n\n")
    assert classify_cli(["--checkpoint", str(tmp_path), "--file", str(texts_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam  ham 0.") and lines[0].endswith(texts[0])
    assert lines[1].startswith("ham   ham 0.") and lines[1].endswith(texts[1])
    assert classify_cli(["--checkpoint", str(tmp_path), "--json", "--threshold", "tuned", texts[0]]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["label"] == "spam" and record["probabilities"]["spam"] == pytest.approx(probabilities[0, 1], abs=1e-5)
    for bad, message in (("abc", "expected a number or 'tuned'"), ("1.5", "must be between 0 and 1")):
        with pytest.raises(UserError, match=f"--threshold: {message}"):
            classify_cli(["--checkpoint", str(tmp_path), "--threshold", bad, texts[0]])


def test_lora_run_merges_adapters_into_the_final_checkpoint(tmp_path):
    rows = synthetic_rows(150, seed=1, labels=("0", "1", "2"))
    records = [json.dumps({"text": text, "label": int(label)}) + "\n" for label, text in rows]
    data = write(tmp_path / "d.jsonl", "".join(records))
    run = tmp_path / "run"
    report = run_script(run, data, "--train.max_steps", "4", "--train.trainable", "lora", "--lora.rank", "2",
                        "--lora.targets", "q_proj,up_proj", "--classifier.pooling", "mean")
    assert report["labels"] == ["0", "1", "2"] and "roc_auc" not in report["after"]
    assert len(report["after"]["confusion_matrix"]) == 3
    # LoRA rank 2 on q_proj (32 -> 32) and up_proj (32 -> 128) of the one block, plus a 3-class head:
    assert report["run"]["trainable_parameters"] == 2 * (32 + 32) + 2 * (32 + 128) + 32 * 3 + 3
    best, final = (load_checkpoint(run / "checkpoints" / f"{name}.pt")["model"] for name in ("best", "final"))
    assert any(key.endswith("lora_A") for key in best)
    assert not any("lora" in key for key in final)
    texts = ["WIN cash", "see you"]
    results = []
    for path in (run / "checkpoints" / "best.pt", run / "checkpoints" / "final.pt"):
        model, info, tokenizer_name = load_classifier(path)
        results.append(classify_texts(model, get_tokenizer(tokenizer_name), texts, info["pad_id"]))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)

    with pytest.raises(UserError, match=r"--threshold needs a two-class model; this one has 3 classes"):
        classify_cli(["--checkpoint", str(run), "--threshold", "0.5", "hello"])
    bad = write(tmp_path / "texts.jsonl", '{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(UserError, match=r"texts\.jsonl, line 2: expected an object with a string \"text\" field"):
        classify_cli(["--checkpoint", str(run), "--file", str(bad)])


def test_resume_continues_bit_for_bit(tmp_path, sms_like, monkeypatch):
    common = ["--train.max_steps", "8", "--data.group_by_length", "true", "--data.balance", "weight"]
    run_script(tmp_path / "straight", sms_like, *common)

    original, calls = ClassificationBatchLoader.next_batch, {"n": 0}

    def next_batch_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(ClassificationBatchLoader, "next_batch", next_batch_with_interrupt)
    args = [*TINY_RUN, "--data.path", str(sms_like), "--train.out_dir", str(tmp_path / "resumed"), *common]
    assert finetune_classifier.main(args) == 130  # interrupted by Ctrl-C, after saving
    assert "after" not in json.loads((tmp_path / "resumed" / "report.json").read_text())
    monkeypatch.setattr(ClassificationBatchLoader, "next_batch", original)
    resumed = run_script(tmp_path / "resumed", sms_like, *common, "--train.resume", "auto")
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert [r["loss"] for r in metrics(tmp_path / "resumed", "train")] == \
        [r["loss"] for r in metrics(tmp_path / "straight", "train")]
    assert resumed["after"] == straight["after"]


def test_balancing_options(tmp_path, sms_like, capsys):
    report = run_script(tmp_path / "down", sms_like, "--train.max_steps", "1", "--data.balance", "downsample")
    train_size = report["run"]["split_sizes"]["train"]
    assert train_size % 2 == 0 and train_size < 160  # both classes cut to the smaller one
    run_script(tmp_path / "weight", sms_like, "--train.max_steps", "1", "--data.balance", "weight")
    assert "class weights [" in capsys.readouterr().out


@pytest.mark.parametrize("setup, message", [
    (lambda d: ("test_path", write(d / "test.tsv", "ham\thello\nmaybe\twho knows\n")),
     r"test\.tsv, line 2: label 'maybe' never appears in the training data \(training labels: ham, spam\)"),
    (lambda d: ("path", write(d / "one.tsv", "ham\ta\nham\tb\nham\tc\n")),
     r"one\.tsv: every example has the label 'ham'"),
    (lambda d: ("path", write(d / "empty.tsv", "ham\ta\nspam\t \n")), r"empty\.tsv, line 2: empty text"),
    (lambda d: ("path", write(d / "bad.tsv", "ham\ta\nspam b\n")), r"bad\.tsv, line 2: 1 tab-separated columns"),
    (lambda d: ("text_column", "message"), r"no column named 'message' in the header \(line 1: 'ham', "),
])
def test_bad_input_stops_before_a_run_folder_is_made(tmp_path, sms_like, setup, message):
    field, value = setup(tmp_path)
    args = [*TINY_RUN, "--data.path", str(sms_like), f"--data.{field}", str(value),
            "--train.out_dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match=message):
        finetune_classifier.main(args)
    assert not (tmp_path / "run").exists()


def test_last_n_beyond_the_depth_from_the_command_line(tmp_path, sms_like):
    args = [*TINY_RUN, "--data.path", str(sms_like), "--train.trainable", "last:2", "--train.out_dir", str(tmp_path)]
    with pytest.raises(UserError, match=r"last:2 asks for the last 2 blocks, but the model has 1"):
        finetune_classifier.main(args)


def test_model_from_our_pretraining_checkpoint(tmp_path, sms_like):
    torch.manual_seed(0)
    pretrained = GPT(ModelConfig(vocab_size=50257, context_length=32, d_model=32, n_layer=2, n_head=2))
    save_checkpoint(tmp_path / "pre" / "checkpoints" / "best.pt", pretrained, tokenizer="gpt2")
    args = ["--model", str(tmp_path / "pre"), "--train.trainable", "last:1", "--train.max_steps", "2",
            "--data.path", str(sms_like), "--train.out_dir", str(tmp_path / "run"), "--classifier.max_length", "32",
            "--train.dtype", "float32", "--train.eval_interval", "2"]
    assert finetune_classifier.main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["model"].startswith(f"{tmp_path / 'pre'} (checkpoint")
    model, _, _ = load_classifier(tmp_path / "run")
    # The blocks that did not train are the pretrained ones, bit for bit.
    torch.testing.assert_close(model.gpt.blocks[0].state_dict(), pretrained.blocks[0].state_dict(), rtol=0, atol=0)
    assert not torch.equal(model.gpt.blocks[1].mlp.up_proj.weight, pretrained.blocks[1].mlp.up_proj.weight)


def test_command_line_errors_have_no_traceback(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    result = subprocess.run([sys.executable, str(REPO / "finetune_classifier.py"), "--data.path", str(bad),
                             "--train.out_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}, line 2, column 14: not valid JSON (Expecting ',' delimiter)"


# ----------------------------------------------------------------------------
# A real pretrained model (slow: loads SmolLM2-135M, which must be fetched first; no test downloads)
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_prediction_does_not_depend_on_padding(smollm2_gguf):
    from gpt.weights import load_pretrained

    tokenizer = get_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    model = GPTClassifier(load_pretrained("smollm2-135m-instruct"), 2, "last", 128).eval()
    short = tokenizer.encode("Call now to claim your prize")
    long = tokenizer.encode("Sorry, I'll call later. " * 8)
    batch = torch.full((2, len(long)), tokenizer.pad_id or 0)
    batch[0, :len(short)], batch[1] = torch.tensor(short), torch.tensor(long)
    with torch.no_grad():
        alone = model(torch.tensor([short]), torch.tensor([len(short)]))
        padded = model(batch, torch.tensor([len(short), len(long)]))
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_lora_run_on_a_slice_of_sms(tmp_path, smollm2_gguf):
    lines = (REPO / "data" / "sms_spam_collection.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    data = write(tmp_path / "sms.tsv", "".join(lines[:300]))
    args = ["--model", "smollm2-135m-instruct", "--data.path", str(data), "--train.out_dir", str(tmp_path / "run"),
            "--train.trainable", "lora", "--train.max_steps", "3", "--train.batch_size", "4",
            "--train.eval_interval", "3", "--classifier.max_length", "32"]
    assert finetune_classifier.main(args) == 0
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert final["tokenizer"] == "smollm2-135m-instruct" and not any("lora" in key for key in final["model"])


def test_lora_on_an_int8_base_trains_and_the_final_checkpoint_is_float(tmp_path):
    """train.quantize int8: the frozen projections run as int8 codes; the final checkpoint holds their
    dequantized weights (each row an integer multiple of its scale) and loads without quantization code."""
    data = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": int(label == "spam")}) + "\n"
                                               for label, t in synthetic_rows(150, seed=2)))
    run = tmp_path / "run"
    report = run_script(run, data, "--train.max_steps", "12", "--train.trainable", "lora", "--lora.rank", "2",
                        "--lora.targets", "q_proj,v_proj", "--train.quantize", "int8")
    assert report["after"]["accuracy"] > report["before"]["accuracy"]
    best, final = (load_checkpoint(run / "checkpoints" / f"{name}.pt")["model"] for name in ("best", "final"))
    assert "gpt.blocks.0.attn.k_proj.base.qweight" not in best and "gpt.blocks.0.attn.k_proj.qweight" in best
    frozen = final["gpt.blocks.0.attn.k_proj.weight"]  # not adapted: its dequantized int8 weight
    steps = frozen / (frozen.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    model, info, tokenizer_name = load_classifier(run)
    probabilities = classify_texts(model, get_tokenizer(tokenizer_name), ["WIN cash now", "see you"], info["pad_id"])
    assert probabilities.shape == (2, 2)


def test_classify_quantizes_as_it_loads(tmp_path, sms_like, capsys):
    run_script(tmp_path, sms_like, "--train.max_steps", "8")
    model, info, tokenizer_name = load_classifier(tmp_path)
    texts = ["WIN FREE cash now claim", "see you at lunch mum"]
    expected = classify_texts(model, get_tokenizer(tokenizer_name), texts, info["pad_id"])
    capsys.readouterr()
    assert classify_cli(["--checkpoint", str(tmp_path), "--json", "--quantize", "int8", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, probabilities in zip(rows, expected):
        assert row["probabilities"]["spam"] == pytest.approx(probabilities[1], abs=0.02)  # int8's small error
    with pytest.raises(UserError, match="--quantize"):
        classify_cli(["--checkpoint", str(tmp_path), "--quantize", "int4:7", texts[0]])
