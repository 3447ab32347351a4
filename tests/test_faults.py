"""Fault injection: kills, signals, a full disk, concurrent runs, and the files a fault must not cost.

Every case runs the real script in a subprocess and compares against an uninterrupted
run of the same config: the metrics and the final weights of a run killed (kill -9) at
random moments, inside checkpoint writes too, and resumed, must equal the straight run's
bit for bit; no temporary file may outlive the next start; a second run may never write
over the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.context_length", "32",
    "--model.dropout", "0.1", "--train.batch_size", "4", "--train.eval_batches", "2", "--train.log_interval", "1",
    "--train.warmup_steps", "2", "--train.dtype", "float32", "--sample.max_new_tokens", "2",
    "--train.max_steps", "8", "--train.eval_interval", "1",  # a checkpoint after every step: many writes to hit
]

# Runs pretrain.py after arranging its own death: argv = MODE N SCRIPT_ARGS...
#   in-save        the Nth torch.save writes a few bytes of its checkpoint, then the process is killed (-9)
#   before-rename  killed right after the Nth fsync: a complete temporary file not yet renamed, or a rename
#                  not yet made durable
#   term-at-save   the Nth torch.save first sends the process a SIGTERM (as a cluster's scheduler would)
#   int-int-at-save  the Nth torch.save first gets two Ctrl-Cs (SIGINT twice): the second lands mid-write
#   none           no injected fault (the test may still kill or signal it from outside)
LAUNCHER = """
import os, runpy, signal, sys
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def counted():
    calls[0] += 1
    return calls[0] == n
if mode.endswith("-save"):
    import torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if counted():
            if mode == "in-save":
                f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            for sig in {"term-at-save": [signal.SIGTERM], "int-int-at-save": [signal.SIGINT] * 2}[mode]:
                os.kill(os.getpid(), sig)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode == "before-rename":
    real_fsync = os.fsync
    def fsync(fd):
        real_fsync(fd)
        if counted():
            os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = fsync
sys.argv = ["pretrain.py", *sys.argv[3:]]
runpy.run_path("pretrain.py", run_name="__main__")
"""


def pretrain(out_dir: Path, corpus: Path, *extra: str, mode: str = "none", n: int = 0) -> subprocess.Popen:
    command = [sys.executable, "-c", LAUNCHER, mode, str(n), *RUN, "--data.path", str(corpus),
               "--train.out_dir", str(out_dir), *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for the process; returns (exit code, what it printed: stdout, then stderr)."""
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout + stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> Path:
    """The uninterrupted run every faulted run must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    code, stderr = finish(pretrain(out_dir, corpus))
    assert code == 0, stderr[-2000:]
    return out_dir


def records(out_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # speeds and memory peaks differ between runs; everything else must not
        for timing in ("tokens_per_s", "mfu", "peak_memory_mib"):
            record.pop(timing, None)
    return records


def temporaries(out_dir: Path) -> list[Path]:
    return sorted(out_dir.rglob("*.tmp"))


def assert_same_run(faulted: Path, straight: Path) -> None:
    """The faulted run's metrics (losses, gradient norms, learning rates, tokens seen; each step once)
    and final weights equal the straight run's exactly."""
    assert records(faulted) == records(straight)
    a = load_checkpoint(straight / "checkpoints" / "latest.pt")
    b = load_checkpoint(faulted / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert temporaries(faulted) == []


def resume_to_the_end(out_dir: Path, corpus: Path) -> str:
    code, stderr = finish(pretrain(out_dir, corpus, "--train.resume", "auto"))
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    return stderr


# ----------------------------------------------------------------------------
# kill -9: inside checkpoint writes, between write and rename, and at random moments
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kills", [
    pytest.param([("before-rename", 1), ("in-save", 2), ("timed", 0)], marks=pytest.mark.slow),  # ~40 s each
    pytest.param([("in-save", 1), ("in-save", 3), ("before-rename", 5)], marks=pytest.mark.slow),
    pytest.param([("timed", 1), ("timed", 2), ("in-save", 4)], marks=pytest.mark.slow),
], ids=["mixed", "writes", "random-times"])
def test_kill_9_anywhere_then_resume_equals_the_straight_run(tmp_path, corpus, straight, kills):
    out_dir = tmp_path / "run"
    rng = random.Random(sum(n for _, n in kills))
    for attempt, (mode, n) in enumerate(kills):
        resume = ["--train.resume", "auto"] if attempt else []
        if mode == "timed":
            process = pretrain(out_dir, corpus, *resume)
            time.sleep(rng.uniform(2.0, 7.0))  # from inside the imports to the last steps
            process.kill()
            finish(process)
        else:
            code, stderr = finish(pretrain(out_dir, corpus, *resume, mode=mode, n=n))
            assert code == -signal.SIGKILL, stderr[-2000:]  # the injected death happened
        latest = out_dir / "checkpoints" / "latest.pt"
        if latest.exists():
            load_checkpoint(latest)  # never damaged, whatever the moment
    resume_to_the_end(out_dir, corpus)
    assert_same_run(out_dir, straight)


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_records(tmp_path, corpus, straight):
    out_dir = tmp_path / "run"
    code, _ = finish(pretrain(out_dir, corpus, mode="in-save", n=1))  # the step-0 record is written, no checkpoint
    assert code == -signal.SIGKILL
    assert [r["step"] for r in records(out_dir)][:1] == [0]
    stderr = resume_to_the_end(out_dir, corpus)
    assert "dropped" in stderr
    assert_same_run(out_dir, straight)


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------


def wait_for_train_records(out_dir: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out_dir / "metrics.jsonl").exists() and \
                sum('"train"' in line for line in (out_dir / "metrics.jsonl").read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("the run logged no training steps")


def test_sigterm_from_outside_saves_and_exits_143(tmp_path, corpus):
    out_dir = tmp_path / "run"
    process = pretrain(out_dir, corpus, "--train.max_steps", "400")  # long enough to be stopped halfway
    wait_for_train_records(out_dir, 2, process)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped at step" in stderr
    assert load_checkpoint(out_dir / "checkpoints" / "latest.pt")["step"] == records(out_dir)[-1]["step"]
    assert temporaries(out_dir) == []


def test_double_ctrl_c_from_outside_exits_130_without_a_traceback(tmp_path, corpus):
    out_dir = tmp_path / "run"
    process = pretrain(out_dir, corpus, "--train.max_steps", "400")
    wait_for_train_records(out_dir, 2, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    code, stderr = finish(process)
    assert code == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr
    load_checkpoint(out_dir / "checkpoints" / "latest.pt")
    assert temporaries(out_dir) == []


@pytest.mark.parametrize("mode, code", [("term-at-save", 128 + signal.SIGTERM), ("int-int-at-save", 128 + signal.SIGINT)])
def test_signals_during_a_checkpoint_write_then_resume_equals_the_straight_run(tmp_path, corpus, straight, mode, code):
    """SIGTERM: the step's checkpoints are written, then the run stops (143). Two Ctrl-Cs: the second arrives
    mid-write, the write finishes first, then the run stops at once (130). Either way it resumes exactly."""
    out_dir = tmp_path / "run"
    exit_code, stderr = finish(pretrain(out_dir, corpus, mode=mode, n=4))
    assert exit_code == code and "Traceback" not in stderr, stderr[-2000:]
    assert load_checkpoint(out_dir / "checkpoints" / "latest.pt")["step"] < 8
    resume_to_the_end(out_dir, corpus)
    assert_same_run(out_dir, straight)


# ----------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A factory of tmpfs mounts of a given size (root only; skipped elsewhere), unmounted afterwards."""
    mounts = []

    def mount(megabytes: float) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs to fill needs root")
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_is_a_clear_error_and_the_earlier_checkpoint_survives(tmp_path, corpus, straight, small_disk):
    size = (straight / "checkpoints" / "latest.pt").stat().st_size
    disk = small_disk(1.5 * size / 2**20)  # room for latest.pt, not for best.pt beside it
    out_dir = disk / "run"
    code, stderr = finish(pretrain(out_dir, corpus))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[-1].startswith("error: ") and "no space left" in lines[-1] and "best.pt" in lines[-1]
    assert "MiB" in lines[-1]  # the space it needs
    assert load_checkpoint(out_dir / "checkpoints" / "latest.pt")["step"] == 1
    assert temporaries(out_dir) == []


def test_convert_onto_a_full_disk_is_a_clear_error(tmp_path, straight, small_disk):
    disk = small_disk(1)
    done = subprocess.run([sys.executable, "-m", "gpt", "convert", str(straight), "--out", str(disk / "hf")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "no space left" in done.stderr
    assert temporaries(disk) == []


# ----------------------------------------------------------------------------
# Runs that would write over each other
# ----------------------------------------------------------------------------


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


def clear_error(command: list[str]) -> str:
    """Run a command that must fail with one `error:` line naming the problem; returns that line."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def test_a_second_run_into_a_finished_run_folder_is_refused_and_changes_nothing(straight, corpus):
    before = digests(straight)
    line = clear_error([sys.executable, "pretrain.py", *RUN, "--data.path", str(corpus),
                        "--train.out_dir", str(straight)])
    assert line.startswith("error: train.out_dir:") and str(straight) in line and "--train.resume auto" in line
    assert digests(straight) == before


def test_two_runs_started_together_into_one_folder(tmp_path, corpus):
    out_dir = tmp_path / "run"
    first, second = pretrain(out_dir, corpus), pretrain(out_dir, corpus)
    results = sorted([finish(first), finish(second)])
    (ok, _), (refused, stderr) = results
    assert ok == 0 and refused == 2, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: train.out_dir:") and str(out_dir) in line
    assert [r["step"] for r in records(out_dir) if r["split"] == "train"] == list(range(1, 9))


def test_resume_auto_without_a_run_folder_is_an_error(corpus):
    line = clear_error([sys.executable, "pretrain.py", *RUN, "--data.path", str(corpus), "--train.resume", "auto"])
    assert line.startswith("error: train.resume auto:") and "--train.out_dir" in line


def test_convert_into_a_run_folder_is_refused_and_changes_nothing(straight):
    before = digests(straight)
    line = clear_error([sys.executable, "-m", "gpt", "convert", str(straight), "--out", str(straight)])
    assert line.startswith("error: --out:") and str(straight) in line
    assert digests(straight) == before
