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

import gpt.tasks
import pretrain
from gpt import checkpoint as checkpoint_module
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.data import BatchLoader
from gpt.errors import UserError
from gpt.model import GPT
from gpt.runtime import Runtime
from gpt.train import TrainingStopped

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "1",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "3",
]


def run(out_dir: Path, corpus: Path, *extra: str, exit_code: int = 0) -> None:
    assert pretrain.main([*SMALL_RUN, "--data.path", str(corpus), "--train.out_dir", str(out_dir), *extra]) == exit_code


def metrics(out_dir: Path, split: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def run_interrupted_then_resumed(out_dir: Path, corpus: Path, monkeypatch, step: int, *extra: str) -> None:
    """A run that a SIGINT stops during `step` (the loop saves at the end of that step), then resumed to the end."""
    original, calls = BatchLoader.next_batch, {"n": 0}

    def next_batch_with_interrupt(self):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(BatchLoader, "next_batch", next_batch_with_interrupt)
        run(out_dir, corpus, *extra, exit_code=128 + signal.SIGINT)  # 130, as a shell reports Ctrl-C
    assert load_checkpoint(out_dir / "checkpoints" / "latest.pt")["step"] == step
    run(out_dir, corpus, *extra, "--train.resume", "auto")


def test_resume_continues_bit_for_bit(tmp_path, corpus, monkeypatch):
    common = ["--train.max_steps", "8", "--train.eval_interval", "2", "--model.dropout", "0.1"]
    run(tmp_path / "straight", corpus, *common)
    run_interrupted_then_resumed(tmp_path / "resumed", corpus, monkeypatch, 5, *common)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert [r["step"] for r in metrics(resumed, "train")] == list(range(1, 9))
    assert [r["loss"] for r in metrics(resumed, "train")] == [r["loss"] for r in metrics(straight, "train")]
    assert [r["loss"] for r in metrics(resumed, "val")] == [r["loss"] for r in metrics(straight, "val")]
    assert [r["tokens"] for r in metrics(resumed, "train")] == [r["tokens"] for r in metrics(straight, "train")]
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
    # No clipping: it would hide a wrong gradient scale from the weights (and so would Adam's scale invariance),
    # so the gradient norm of every step is compared too.
    common = ["--train.max_steps", "3", "--train.eval_interval", "3", "--train.grad_clip", "0"]
    run(tmp_path / "big", corpus, *common, "--train.batch_size", "8")
    run(tmp_path / "accum", corpus, *common, "--train.batch_size", "2", "--train.grad_accum_steps", "4")
    big, accum = metrics(tmp_path / "big", "train"), metrics(tmp_path / "accum", "train")
    assert len(big) == len(accum) == 3
    for x, y in zip(big, accum):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)
        assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4)
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
        assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4)  # averaged across processes, not summed
    a = load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


def test_fp16_resume_restores_the_gradient_scaler(tmp_path, corpus, monkeypatch):
    """float16 autocast (on the CPU here) trains with a GradScaler; its scale and growth count are checkpointed
    and restored, so a resumed run ends as the straight one does. Checkpoints without it still resume."""
    common = ["--train.max_steps", "4", "--train.eval_interval", "2", "--train.dtype", "float16"]
    run(tmp_path / "straight", corpus, *common)
    run_interrupted_then_resumed(tmp_path / "resumed", corpus, monkeypatch, 3, *common)

    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert straight["scaler"]["_growth_tracker"] == 4  # no overflow: one growth count per step
    assert resumed["scaler"] == straight["scaler"]
    assert [r["loss"] for r in metrics(tmp_path / "resumed", "train")] == \
        [r["loss"] for r in metrics(tmp_path / "straight", "train")]

    older = tmp_path / "older" / "checkpoints" / "latest.pt"
    older.parent.mkdir(parents=True)
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")  # step 4
    del state["scaler"]
    torch.save(state, older)
    run(tmp_path / "older", corpus, "--train.max_steps", "5", "--train.eval_interval", "5", "--train.dtype", "float16",
        "--train.resume", "auto")
    assert load_checkpoint(older)["scaler"]["_growth_tracker"] == 1  # a fresh scaler, one step old


def test_the_script_closes_the_runtime_it_opened_and_train_leaves_it_open(tmp_path, corpus, monkeypatch):
    events = []
    real_train = pretrain.train

    def recorded_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        events.append("trained")
        return result

    monkeypatch.setattr(pretrain, "train", recorded_train)
    monkeypatch.setattr(Runtime, "close", lambda self, wait_for_others=True: events.append("closed"))
    run(tmp_path, corpus, "--train.max_steps", "1")
    assert events == ["trained", "closed"]


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, corpus, monkeypatch):
    calls = {"n": 0}
    real_loss = gpt.tasks.next_token_loss

    def loss_that_explodes(model, batch):
        calls["n"] += 1
        loss = real_loss(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(gpt.tasks, "next_token_loss", loss_that_explodes)
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


def test_resume_from_another_shape_names_both_shapes(tmp_path, corpus):
    run(tmp_path, corpus, "--train.max_steps", "2", "--train.eval_interval", "2")
    with pytest.raises(UserError, match=r"\(checkpoint vs this run: d_model 32 vs 64; d_ff 128 vs 256\)"):
        run(tmp_path, corpus, "--train.max_steps", "4", "--train.resume", "auto", "--model.d_model", "64")
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 2


def test_command_line_errors_have_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "pretrain.py", "--train.max_stepz", "3", "--train.out_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: train.max_stepz: unknown field")
    assert "Traceback" not in done.stderr


def _vote(rank: int, world_size: int, port: int, results) -> None:
    """One process of a two-process group: rank 1 alone wants to stop."""
    import torch.distributed as dist

    from gpt.train import any_process

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        runtime = Runtime(torch.device("cpu"), torch.float32, Path("."), rank=rank, world_size=world_size)
        results[rank] = (any_process(rank == 1, runtime), any_process(False, runtime))
    finally:
        dist.destroy_process_group()


def test_a_stop_wanted_by_one_process_is_taken_by_all():
    """Early stopping and stop signals are decided together (F14): a rank whose evaluation alone says stop
    must not leave the others waiting in their next collective."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_vote, args=(2, 29541, results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}


def test_a_diverged_validation_loss_is_never_the_best(tmp_path, corpus, monkeypatch, capsys):
    """The first evaluation after training blows up (1e12; then nan): best.pt is not written from it."""
    real_evaluate, losses = gpt.tasks.language_model_metrics, iter([None, 1e12, float("nan"), None])

    def evaluate_that_diverges(*args, **kwargs):
        loss = next(losses)
        metrics = real_evaluate(*args, **kwargs)
        return metrics if loss is None else {**metrics, "loss": loss}

    monkeypatch.setattr(gpt.tasks, "language_model_metrics", evaluate_that_diverges)
    run(tmp_path, corpus, "--train.max_steps", "3", "--train.eval_interval", "1")
    said = capsys.readouterr().out
    assert "validation loss 1e+12 is over 2 times the untrained model's" in said and "is not finite" in said
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 3 and math.isfinite(best["best_val_loss"]) and best["best_val_loss"] < 20


def test_a_damaged_latest_checkpoint_falls_back_to_best(tmp_path, corpus, capsys):
    run(tmp_path, corpus, "--train.max_steps", "4", "--train.eval_interval", "2", "--train.patience", "0")
    best_step = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"]
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as by a failing disk
    run(tmp_path, corpus, "--train.max_steps", "6", "--train.eval_interval", "2", "--train.resume", "auto")
    assert f"resuming from {tmp_path / 'checkpoints' / 'best.pt'} (step {best_step}) instead" in capsys.readouterr().err
    assert load_checkpoint(latest)["step"] == 6
    with pytest.raises(UserError, match="not a readable checkpoint"):  # named explicitly: no fallback
        latest.write_bytes(b"garbage")
        run(tmp_path, corpus, "--train.max_steps", "7", "--train.resume", str(latest))


@pytest.mark.slow  # compiles the fused AdamW kernel (seconds to tens of seconds)
def test_the_fused_optimizer_trains_as_the_multi_tensor_path(tmp_path, corpus):
    """train.fused_optimizer: the compiled update gives the default path's losses to float rounding, and a
    resumed run keeps the path its config names."""
    common = ["--train.max_steps", "3", "--train.eval_interval", "3"]
    run(tmp_path / "default", corpus, *common)
    run(tmp_path / "fused", corpus, *common, "--train.fused_optimizer", "true")
    for a, b in zip(metrics(tmp_path / "default", "train"), metrics(tmp_path / "fused", "train"), strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    run(tmp_path / "fused", corpus, "--train.max_steps", "4", "--train.eval_interval", "4",
        "--train.resume", "auto")
    groups = load_checkpoint(tmp_path / "fused" / "checkpoints" / "latest.pt")["optimizer"]["param_groups"]
    assert [group["fused"] for group in groups] == [False, False]
