"""Training across processes (gpt.parallel) and sharded checkpoints (gpt.sharded_checkpoint), on the CPU with gloo.

Two processes run pretrain.py's main one after another (in the tests marked slow, which CI runs with the
slow set): FSDP, DDP, and an FSDP run stopped at step 2 and resumed. The references are independent of FSDP: one
process on the whole global batch, the DDP run, and the uninterrupted FSDP run.
"""

import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import pretrain
from gpt import sharded_checkpoint
from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.optim import AdamW, param_groups
from gpt.resume import find_resume_checkpoint
from gpt.run_folder import run_files
from gpt.sharded_checkpoint import consolidate, consolidate_cli, is_sharded_checkpoint, write_sharded
from tests.test_train import SMALL_RUN, metrics, run

STEPS = 4
COMMON = ["--train.max_steps", str(STEPS), "--train.eval_interval", "2", "--train.schedule", "constant",
          "--train.grad_accum_steps", "2", "--model.n_layer", "2", "--train.curves", "false"]
PER_PROCESS_BATCH = ["--train.batch_size", "2"]  # 2 processes x 2 rows x 2 micro-batches = 8 rows a step


def _two_processes(rank: int, corpus: str, out: str, port: int) -> None:
    """One of two processes: the FSDP run, the DDP run (recomputing activations), and the FSDP run in two parts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    base = [*SMALL_RUN, *COMMON, *PER_PROCESS_BATCH, "--data.path", corpus]
    launches = [
        ("fsdp", ["--train.parallel", "fsdp"]),
        ("ddp", ["--train.parallel", "ddp", "--train.activation_checkpointing", "true"]),
        ("resumed", ["--train.parallel", "fsdp", "--train.max_steps", "2"]),
        ("resumed", ["--train.parallel", "fsdp", "--train.resume", "auto"]),
    ]
    for index, (name, extra) in enumerate(launches):
        os.environ["MASTER_PORT"] = str(port + index)  # a fresh process group for each launch
        assert pretrain.main([*base, *extra, "--train.out_dir", str(Path(out) / name)]) == 0
        if index == 2 and rank == 0:  # the step-2 checkpoint, for resuming in one process
            shutil.copytree(Path(out) / name / "checkpoints" / "latest", Path(out) / "step2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(_two_processes, args=(str(corpus), str(out), 29610), nprocs=2, join=True)
    run(out / "single", corpus, *COMMON, "--train.batch_size", "4")  # the same 8 rows a step, in one process
    return out


def train_losses(folder: Path) -> list[float]:
    return [record["loss"] for record in metrics(folder, "train")]


@pytest.mark.slow  # the two-process runs (~20-40 s); CI runs the slow set too
def test_fsdp_ddp_and_one_process_train_alike(runs):
    single = metrics(runs / "single", "train")
    assert len(single) == STEPS
    for name in ("fsdp", "ddp"):
        for x, y in zip(single, metrics(runs / name, "train"), strict=True):
            assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5), name
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4), name  # the norm over all shards
    whole = load_checkpoint(runs / "single" / "checkpoints" / "latest.pt")["model"]
    sharded = runs / "fsdp" / "checkpoints" / "latest"
    assert is_sharded_checkpoint(sharded) and not (runs / "fsdp" / "checkpoints" / "latest.pt").exists()
    gathered = load_checkpoint(sharded)["model"]  # consolidated on the fly
    assert set(gathered) == set(whole)
    for name in whole:
        torch.testing.assert_close(gathered[name], whole[name], atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # the two-process runs (~20-40 s); CI runs the slow set too
def test_fsdp_resume_continues_bit_for_bit(runs):
    assert train_losses(runs / "resumed") == train_losses(runs / "fsdp")
    assert [r["loss"] for r in metrics(runs / "resumed", "val")] == [r["loss"] for r in metrics(runs / "fsdp", "val")]
    straight = load_checkpoint(runs / "fsdp" / "checkpoints" / "latest")
    resumed = load_checkpoint(runs / "resumed" / "checkpoints" / "latest")
    assert all(torch.equal(straight["model"][name], resumed["model"][name]) for name in straight["model"])
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert a["step"] == b["step"] == STEPS
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.slow  # the two-process runs (~20-40 s); CI runs the slow set too
def test_a_sharded_checkpoint_resumes_in_one_process(runs, corpus):
    """Written by two processes at step 2, continued by one on the same global batch: as the FSDP run went on."""
    out = runs / "one-process"
    run(out, corpus, *COMMON, "--train.batch_size", "4", "--train.resume", str(runs / "step2"))
    continued = metrics(out, "train")
    assert [r["step"] for r in continued] == [3, 4]
    for x, y in zip(continued, metrics(runs / "fsdp", "train")[2:], strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)


@pytest.mark.slow  # the two-process runs (~20-40 s); CI runs the slow set too
def test_consolidation_round_trip(runs, tmp_path, capsys):
    sharded = runs / "fsdp" / "checkpoints" / "latest"
    assert consolidate_cli([str(sharded), "--out", str(tmp_path / "whole.pt")]) == 0
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)  # an ordinary checkpoint file
    assert whole["step"] == STEPS and whole["format"] == "gpt-checkpoint"
    model = model_from_checkpoint(whole)
    assert isinstance(model, GPT) and model.config.n_layer == 2
    assert consolidate_cli([str(tmp_path / "whole.pt"), "--out", str(tmp_path / "again")]) == 0
    again = consolidate(tmp_path / "again")
    assert all(torch.equal(whole["model"][k], again["model"][k]) for k in whole["model"])
    assert whole["optimizer"]["param_groups"] == again["optimizer"]["param_groups"]
    for a, b in zip(whole["optimizer"]["state"].values(), again["optimizer"]["state"].values(), strict=True):
        assert a["step"] == b["step"] and torch.equal(a["exp_avg"], b["exp_avg"])
    assert {k: v for k, v in whole.items() if k not in ("model", "optimizer", "rng")} == \
        {k: v for k, v in again.items() if k not in ("model", "optimizer", "rng")}
    with pytest.raises(UserError, match="exists already"):
        consolidate_cli([str(sharded), "--out", str(tmp_path / "whole.pt")])
    with pytest.raises(UserError, match="neither a checkpoint file nor"):
        consolidate_cli([str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")])


def test_an_ordinary_checkpoint_of_another_model_is_not_sharded(tmp_path):
    state = {"format": "gpt-checkpoint", "model_config": ModelConfig(vocab_size=64, context_length=8, d_model=16,
                                                                     n_layer=1, n_head=2).to_dict(),
             "model": {"classifier.weight": torch.zeros(2, 16)}}
    with pytest.raises(UserError, match="only a language model's checkpoint"):
        write_sharded(state, tmp_path / "out", tmp_path / "in.pt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout):
    """Recomputed in the backward pass (with the same dropout masks), each block's gradients are unchanged."""
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layer=2, n_head=2, dropout=dropout)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        for block in model.blocks:
            block.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the dropout masks
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_fsdp_in_one_process_trains_as_without_it(tmp_path, corpus):
    """Started without torchrun, FSDP gets a process group of one (and leaves it at the end)."""
    common = ["--train.max_steps", "2", "--train.eval_interval", "2", "--train.curves", "false"]
    run(tmp_path / "plain", corpus, *common)
    run(tmp_path / "fsdp", corpus, *common, "--train.parallel", "fsdp")
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-6)
    assert is_sharded_checkpoint(tmp_path / "fsdp" / "checkpoints" / "latest")
    assert not torch.distributed.is_initialized()


def test_fsdp_refuses_what_it_does_not_support(tmp_path, corpus):
    with pytest.raises(UserError, match="float16 needs a sharded gradient scaler"):
        run(tmp_path, corpus, "--train.parallel", "fsdp", "--train.dtype", "float16", "--train.max_steps", "1")


@pytest.fixture
def small_checkpoint(tmp_path) -> dict:
    """An ordinary checkpoint of a one-block model after one AdamW step, as load_checkpoint returns it."""
    config = ModelConfig(vocab_size=64, context_length=8, d_model=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = AdamW(param_groups(model, 0.1))
    ids = torch.randint(0, 64, (2, 9))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    optimizer.step()
    save_checkpoint(tmp_path / "small.pt", model, optimizer=optimizer.state_dict(), step=1,
                    train_config={"weight_decay": 0.1})
    return load_checkpoint(tmp_path / "small.pt")


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_sharded_checkpoint(small_checkpoint, tmp_path,
                                                                                 monkeypatch):
    folder = tmp_path / "checkpoints" / "latest"
    write_sharded(small_checkpoint, folder, tmp_path / "small.pt")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", disk_full)
    with pytest.raises(UserError, match="no space left on the device"):
        write_sharded({**small_checkpoint, "step": 2}, folder, tmp_path / "small.pt")
    assert consolidate(folder)["step"] == 1


def test_a_run_stopped_while_swapping_folders_resumes_from_the_one_set_aside(small_checkpoint, tmp_path):
    write_sharded(small_checkpoint, tmp_path / "checkpoints" / ".latest.previous", tmp_path / "small.pt")
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "checkpoints" / ".latest.previous"


def test_a_fresh_run_does_not_write_over_a_sharded_checkpoint(small_checkpoint, tmp_path):
    write_sharded(small_checkpoint, tmp_path / "checkpoints" / "latest", tmp_path / "small.pt")
    assert run_files(tmp_path) == ["checkpoints/latest/"]
