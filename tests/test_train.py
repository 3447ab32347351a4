"""The training loop end to end through pretrain.py: exact resume, accumulation, DDP, failures, bad input."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from gpt import checkpoint as checkpoint_module
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.data import BatchLoader
from gpt.errors import UserError
from gpt.model import GPT
from gpt.train import TrainingStopped

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "1",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "3",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A slice of Botchan: enough windows for a few steps, small enough to be quick."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    text = (REPO / "data" / "botchan.txt").read_text(encoding="utf-8-sig")
    path.write_text(text[20_000:40_000], encoding="utf-8")
    return path


def run(out_dir: Path, corpus: Path, *extra: str) -> None:
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir), *extra]) == 0


def metrics(out_dir: Path, split: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_resume_continues_bit_for_bit(tmp_path, corpus, monkeypatch):
    common = ["--train.max_steps", "8", "--train.eval_interval", "2", "--model.dropout", "0.1"]
    run(tmp_path / "straight", corpus, *common)

    # Second run: a SIGINT arrives during step 5; the loop saves at the end of that step and stops.
    original, calls = BatchLoader.next_batch, {"n": 0}

    def next_batch_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(BatchLoader, "next_batch", next_batch_with_interrupt)
    run(tmp_path / "resumed", corpus, *common)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")["step"] == 5
    monkeypatch.setattr(BatchLoader, "next_batch", original)
    run(tmp_path / "resumed", corpus, *common, "--train.resume", "auto")

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert [r["step"] for r in metrics(resumed, "train")] == list(range(1, 9))
    assert [r["loss"] for r in metrics(resumed, "train")] == [r["loss"] for r in metrics(straight, "train")]
    assert [r["loss"] for r in metrics(resumed, "val")] == [r["loss"] for r in metrics(straight, "val")]
    a = load_checkpoint(straight / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "latest.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_loss_goes_down_and_run_folder_is_complete(tmp_path, corpus):
    run(tmp_path, corpus, "--train.max_steps", "30", "--train.eval_interval", "10", "--train.lr", "3e-3")
    val = metrics(tmp_path, "val")
    assert val[-1]["loss"] < val[0]["loss"] - 0.5
    assert math.isclose(val[-1]["ppl"], math.exp(val[-1]["loss"]), rel_tol=1e-9)
    record = metrics(tmp_path, "train")[0]
    assert {"step", "split", "loss", "lr", "tokens_per_s"} <= set(record)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["n_layer"] == 1
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["best_val_loss"] == min(r["loss"] for r in val)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus):
    common = ["--train.max_steps", "3", "--train.eval_interval", "3"]
    run(tmp_path / "big", corpus, *common, "--train.batch_size", "8")
    run(tmp_path / "accum", corpus, *common, "--train.batch_size", "2", "--train.grad_accum_steps", "4")
    big, accum = metrics(tmp_path / "big", "train"), metrics(tmp_path / "accum", "train")
    for x, y in zip(big, accum):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)
    a = load_checkpoint(tmp_path / "big" / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "accum" / "checkpoints" / "latest.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


def test_two_process_ddp_matches_single_process(tmp_path, corpus):
    common = [*SMALL_RUN, "--data.path", str(corpus), "--train.max_steps", "3", "--train.eval_interval", "3"]
    run(tmp_path / "single", corpus, "--train.max_steps", "3", "--train.eval_interval", "3", "--train.batch_size", "8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(REPO / "pretrain.py"), *common, "--train.batch_size", "4", "--train.out_dir", str(tmp_path / "ddp")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = metrics(tmp_path / "single", "train"), metrics(tmp_path / "ddp", "train")
    assert len(single) == len(ddp) == 3
    for x, y in zip(single, ddp):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)
    a = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, corpus, monkeypatch):
    calls = {"n": 0}
    real_loss = pretrain.next_token_loss

    def loss_that_explodes(model, batch):
        calls["n"] += 1
        loss = real_loss(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(pretrain, "next_token_loss", loss_that_explodes)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 3"):
        run(tmp_path, corpus, "--train.max_steps", "6", "--train.eval_interval", "2")
    latest = tmp_path / "checkpoints" / "latest.pt"
    assert load_checkpoint(latest)["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_checkpoint(latest)["model"].values())


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = GPT(ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layer=1, n_head=2))
    path = tmp_path / "latest.pt"
    save_checkpoint(path, model, step=1)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def torch_save_dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"empty"),
        ("Just a few words here.", r"has \d+ tokens.*needs? 33"),
    ],
)
def test_bad_corpus_is_a_clear_error(tmp_path, content, message):
    corpus = tmp_path / "small.txt"
    corpus.write_text(content)
    with pytest.raises(UserError, match=message):
        run(tmp_path / "run", corpus, "--train.max_steps", "2")


def test_missing_and_non_utf8_corpus(tmp_path):
    with pytest.raises(UserError, match="nope.txt"):
        run(tmp_path / "run", tmp_path / "nope.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8.*byte offset 3"):
        run(tmp_path / "run", latin1)


def test_resume_from_another_shape_names_the_tensor(tmp_path, corpus):
    run(tmp_path, corpus, "--train.max_steps", "2", "--train.eval_interval", "2")
    with pytest.raises(UserError, match=r"tok_emb.weight has shape \(50257, 32\), the model expects \(50257, 64\)"):
        run(tmp_path, corpus, "--train.max_steps", "4", "--train.resume", "auto", "--model.d_model", "64")
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 2


def test_command_line_errors_have_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "pretrain.py", "--train.max_stepz", "3", "--train.out_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: train.max_stepz: unknown field")
    assert "Traceback" not in done.stderr


FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys, torch
from gpt.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_64_mb_blocks(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        torch.ones(16 * 2**20)  # 64 MB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_64_mb_blocks(4)  # the kept heap settles within a few blocks
print(faults_of_64_mb_blocks(4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_spares_the_page_faults_of_reused_blocks():
    """glibc maps and unmaps each 64 MB block (16K page faults apiece); kept, the memory is reused."""
    def faults(setting: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, setting], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        return int(run.stdout.split()[-1])

    assert faults("default") > 4 * 15_000  # 4 blocks of 16,384 pages of 4 KiB
    assert faults("keep") < 1_000
