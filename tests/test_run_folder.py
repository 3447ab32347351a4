"""Run folders: unique names, one run per folder, the lock, and what verbs may not write over."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gpt.config import TrainConfig
from gpt.errors import UserError
from gpt.files import atomic_write, remove_stale_temporaries
from gpt.metrics_log import MetricsLog
from gpt.run_folder import claim_run_folder, new_run_folder, refuse_run_folder
from gpt.runtime import Runtime


def test_default_names_started_in_the_same_second_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda _: "20260101-120000")
    names = [new_run_folder("pretrain", tmp_path).name for _ in range(3)]
    assert names == ["pretrain-20260101-120000", "pretrain-20260101-120000-2", "pretrain-20260101-120000-3"]


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"))
    folder = claim_run_folder(cfg, "pretrain")
    with pytest.raises(UserError, match="in use by a running run .pid " + str(os.getpid())):
        claim_run_folder(cfg, "pretrain")
    folder.release()
    claim_run_folder(cfg, "pretrain").release()

    # A process that took the lock and was killed: its run.lock stays, its lock does not.
    code = ("import fcntl, os, signal; f = open(%r, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid dead'); "
            "f.flush(); os.kill(os.getpid(), signal.SIGKILL)") % str(tmp_path / "run" / "run.lock")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    claim_run_folder(cfg, "pretrain").release()


def test_a_fresh_run_is_refused_over_another_runs_files_but_may_continue_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"the other run's")
    for resume, allowed in [("", False), ("auto", True), (str(run / "checkpoints" / "latest.pt"), True),
                            (str(tmp_path / "elsewhere.pt"), False)]:
        cfg = TrainConfig(out_dir=str(run), resume=resume)
        if allowed:
            claim_run_folder(cfg, "pretrain").release()
        else:
            with pytest.raises(UserError, match="holds another run .checkpoints/latest.pt"):
                claim_run_folder(cfg, "pretrain")
    assert (run / "checkpoints" / "latest.pt").read_bytes() == b"the other run's"
    with pytest.raises(UserError, match="train.resume auto: .* --train.out_dir"):
        claim_run_folder(TrainConfig(resume="auto"), "pretrain")


def test_verbs_may_not_write_over_a_runs_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for path in (run, run / "config.json", run / "report.md", run / "responses.jsonl"):
        with pytest.raises(UserError, match="--out"):
            refuse_run_folder(path, "--out")
    refuse_run_folder(run / "my-eval.jsonl", "--out")  # a new file of the user's own is fine
    refuse_run_folder(tmp_path / "export", "--out")


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".latest.pt.{dead.stdout.strip()}.abc123.tmp"
    live = tmp_path / f".latest.pt.{os.getpid()}.def456.tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists()
    atomic_write(tmp_path / "latest.pt", lambda f: f.write(b"new"))  # sweeps its own name's stale files too
    assert (tmp_path / "latest.pt").read_bytes() == b"new"


def metrics_log_at(out_dir, start_step):
    runtime = Runtime(torch.device("cpu"), torch.float32, out_dir)
    log = MetricsLog(runtime, TrainConfig(), {}, start_step)
    log.close()
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_keep_what_the_checkpoint_saw_and_drop_a_cut_last_line(tmp_path, capsys):
    lines = [json.dumps({"step": s, "split": "train"}) for s in (0, 1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "spl')
    assert metrics_log_at(tmp_path, 3) == [0, 1, 2, 3]
    assert "cut short" in capsys.readouterr().err
    assert metrics_log_at(tmp_path, 0) == []  # a restart from scratch keeps nothing of the attempt before


def test_a_bad_line_in_the_middle_of_metrics_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2, column 1: not valid JSON"):
        metrics_log_at(tmp_path, 2)
