"""Checkpoints: atomic writes, safe loads, and the model they hold.

A checkpoint is one `torch.save`d dict of plain containers and tensors, so it
loads with `torch.load(weights_only=True)` (no arbitrary code runs on load):

    format, version      "gpt-checkpoint", 1
    model_config         ModelConfig fields as a dict
    model                the model's state_dict
    tokenizer            tokenizer name ("gpt2") or path it was built from
    ... whatever the writer adds: optimizer, step, rng, data position, train config

Writes are atomic (`gpt.files.atomic_write`: a temporary file in the same folder,
fsynced, then renamed over the final name), so a crash mid-write never leaves a
truncated checkpoint under the real name: the previous one stays loadable.

A run with `train.parallel fsdp` writes sharded checkpoint folders instead
(gpt.sharded_checkpoint); `load_checkpoint` reads those too, consolidated into this dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError, UserError
from .files import atomic_write
from .model import GPT

FORMAT = "gpt-checkpoint"
VERSION = 1


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
    atomic_write(path, lambda f: torch.save(state, f), size_hint=tensor_bytes(state))


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples (about a checkpoint's size on disk)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def resolve_checkpoint_path(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file or sharded checkpoint folder, or a run folder: its checkpoints/final.pt when the run
    wrote one (the model a fine-tuning or continued run ends with, LoRA adapters merged; best.pt may still hold
    them apart), else {which}.pt, falling back to latest.pt (or the sharded folders of the same names)."""
    from .sharded_checkpoint import is_sharded_checkpoint  # it builds on this module

    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        for candidate in (path / "checkpoints" / "final.pt", path / "checkpoints" / f"{which}.pt",
                          path / "checkpoints" / "latest.pt",
                          path / f"{which}.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
        for candidate in (path / "checkpoints" / which, path / "checkpoints" / "latest"):
            if is_sharded_checkpoint(candidate):
                return candidate
        raise UserError(f"{path}: no checkpoint found in this folder (looked for checkpoints/{which}.pt, latest.pt)")
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True`; a missing, truncated or foreign file names the path.
    A sharded checkpoint folder is consolidated into the same dict (on the CPU)."""
    from .sharded_checkpoint import consolidate, is_sharded_checkpoint

    path = resolve_checkpoint_path(path)
    if is_sharded_checkpoint(path):
        return consolidate(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # garbage makes the unpickler fail in any number of ways (KeyError, ValueError, ...)
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
