"""A run folder belongs to one run: its name, its lock, and the checks that keep runs apart.

Every training script writes into one folder (`--train.out_dir`, or a fresh
`runs/<script>-<timestamp>`): config.json, metrics.jsonl, checkpoints/, reports. Before
anything is written there, `claim_run_folder`

- picks the folder: the one given, or a new default name claimed with an atomic
  `mkdir` (two runs started in the same second get `...-153000` and `...-153000-2`);
- locks it for the life of the run: `run.lock` holds an exclusive `flock`, which the
  operating system drops when the process ends, however it ends, so the lock of a
  killed run is taken over by the next one; a second live run is refused;
- refuses to start a fresh run over another run's files (checkpoints, metrics.jsonl,
  config.json, report.json) unless it continues that run (`--train.resume auto`, or a
  checkpoint inside this folder);
- removes the temporary files that writes killed mid-way left behind.

The verbs that write files (`convert --out`, `evaluate --out`, `prepare --out`, `bench
--out`) call `refuse_run_folder` on their output: they never write over a run's files.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from .config import TrainConfig
from .errors import UserError
from .files import remove_stale_temporaries

LOCK_NAME = "run.lock"
RUN_FILES = ("metrics.jsonl", "config.json", "report.json")  # besides checkpoints/*.pt and sharded folders
RUN_OUTPUTS = (*RUN_FILES, "report.md", "responses.jsonl", LOCK_NAME)  # what a verb may not write over


class RunFolder:
    """A claimed run folder; `release()` (or the end of the process) unlocks it."""

    def __init__(self, path: Path, lock_file: IO[str]):
        self.path = path
        self._lock_file: IO[str] | None = lock_file

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


def claim_run_folder(cfg: TrainConfig, script: str) -> RunFolder:
    """The run's folder, created, locked and checked as the module docstring says (rank 0 only)."""
    if cfg.resume == "auto" and not cfg.out_dir:
        raise UserError("train.resume auto: continues the run in --train.out_dir, which is not set; "
                        "pass the run folder, e.g. --train.out_dir runs/pretrain-20260101-120000")
    path = Path(cfg.out_dir) if cfg.out_dir else new_run_folder(script)
    if path.exists() and not path.is_dir():
        raise UserError(f"train.out_dir: {path} is a file, not a folder")
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"train.out_dir: cannot create {path} ({err.strerror})") from None
    folder = RunFolder(path, lock(path))
    try:
        refuse_other_runs(path, cfg.resume)
        removed = remove_stale_temporaries(path) + remove_stale_temporaries(path / "checkpoints")
    except BaseException:
        folder.release()
        raise
    if removed:
        print(f"[removed {len(removed)} temporary file(s) that interrupted writes left in {path}: "
              f"{', '.join(p.name for p in removed[:3])}{', ...' if len(removed) > 3 else ''}]", file=sys.stderr)
    return folder


def new_run_folder(script: str, root: Path = Path("runs")) -> Path:
    """runs/<script>-<timestamp>, created now; a name another run took in the same second gets -2, -3, ..."""
    root.mkdir(parents=True, exist_ok=True)
    base = f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        path = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{root}: could not find a free name for a new run folder ({base}-...)")


def lock(path: Path) -> IO[str]:
    """Hold an exclusive lock on path/run.lock (noting our process id in it); a live holder is an error."""
    lock_path = path / LOCK_NAME
    lock_file = lock_path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise UserError(f"train.out_dir: {path} is in use by a running run ({holder}); wait for it to finish, "
                        f"or choose another --train.out_dir") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock_file.flush()
    return lock_file


def run_files(path: Path) -> list[str]:
    """The files in `path` that belong to a run (relative names)."""
    found = [name for name in RUN_FILES if (path / name).is_file()]
    found += sorted(f"checkpoints/{p.name}" for p in (path / "checkpoints").glob("*.pt"))
    found += sorted(f"checkpoints/{p.parent.name}/" for p in (path / "checkpoints").glob("*/meta.pt"))  # sharded
    return found


def refuse_other_runs(path: Path, resume: str) -> None:
    """A fresh run, or a run resumed from a checkpoint elsewhere, may not write over the run in `path`."""
    if resume == "auto":
        return
    if resume and Path(resume).resolve().is_relative_to(path.resolve()):
        return  # continues this folder's own run
    found = run_files(path)
    if found:
        action = f"resuming {resume} there" if resume else "a new run there"
        raise UserError(
            f"train.out_dir: {path} holds another run ({', '.join(found[:4])}); {action} would overwrite it. "
            f"Continue that run with --train.resume auto --train.out_dir {path}, or start this one in a new folder "
            f"(another --train.out_dir, or none for a fresh runs/... name)"
        )


def is_run_folder(path: Path) -> bool:
    """Whether `path` is (or was) a training run's folder."""
    return path.is_dir() and ((path / LOCK_NAME).exists() or bool(run_files(path)))


def refuse_run_folder(path: Path, flag: str) -> None:
    """A UserError naming `flag` when writing `path` (a folder, or a file) would write over a run's files:
    the folder is a run folder, or the file is one of a run folder's own."""
    path = Path(path)
    if is_run_folder(path):
        raise UserError(f"{flag}: {path} is a training run's folder ({', '.join(run_files(path)[:3]) or LOCK_NAME}); "
                        f"write somewhere else")
    if path.name in RUN_OUTPUTS and is_run_folder(path.parent):
        raise UserError(f"{flag}: {path} belongs to the training run in {path.parent}; write somewhere else")
