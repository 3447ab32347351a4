"""Checkpoints: atomic writes, safe loads, and the model they hold.

A checkpoint is one `torch.save`d dict of plain containers and tensors, so it
loads with `torch.load(weights_only=True)` (no arbitrary code runs on load):

    format, version      "gpt-checkpoint", 1
    model_config         ModelConfig fields as a dict
    model                the model's state_dict
    tokenizer            tokenizer name ("gpt2") or path it was built from
    ... whatever the writer adds: optimizer, step, rng, data position, train config

Writes go to a temporary file in the same folder, are fsynced, then renamed over
the final name with `os.replace`, so a crash mid-write never leaves a truncated
checkpoint under the real name: the previous one stays loadable.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import torch

from .config import ModelConfig
from .errors import ConfigError, UserError
from .model import GPT

FORMAT = "gpt-checkpoint"
VERSION = 1


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block succeeds, the file is fsynced and
    renamed to `path` (a crash leaves the old file, never a truncated one); when it fails, it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # the permissions a plainly created file would get, not mkstemp's 0600
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then put it in place atomically."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_checkpoint(path: str | Path, model: GPT, tokenizer: str = "gpt2", **extra: Any) -> None:
    """Write model config + weights + `extra` (optimizer, step, rng, ...) atomically to `path`."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": tokenizer,
        **extra,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def resolve_checkpoint_path(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or a run folder (-> its checkpoints/{which}.pt, falling back to latest.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / f"{which}.pt", path / "checkpoints" / "latest.pt",
                          path / f"{which}.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path}: no checkpoint found in this folder (looked for checkpoints/{which}.pt, latest.pt)")
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True`; a missing, truncated or foreign file names the path."""
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a gpt checkpoint (no '{FORMAT}' format marker)")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> GPT:
    """Rebuild the model a checkpoint dict describes and load its weights."""
    try:
        config = ModelConfig.from_dict(state["model_config"])
    except ConfigError as err:
        raise UserError(f"{path}: bad model_config: {err}") from None
    model = GPT(config)
    load_model_state(model, state["model"], path)
    return model


def load_model_state(model: GPT, weights: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> None:
    """Load weights into `model`, turning a shape or key mismatch into one message that names the tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise UserError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(weights)
