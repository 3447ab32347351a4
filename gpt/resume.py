"""Exact resume: which checkpoint a run continues from, and the random state it saves and restores.

`--train.resume auto` continues from the run folder's checkpoints/latest.pt (or starts
fresh when there is none yet); a damaged latest.pt falls back to best.pt with a message.

A training checkpoint holds, besides model and optimizer, every random number generator
the run draws from (`rng_state`): torch's CPU generator, python's `random`, numpy's
global generator and, on CUDA, the generator of the run's own device. Only the run's own
device: a resume may see another number of GPUs, and under torchrun every rank is seeded
alike and draws alike, so rank 0's device state is each rank's state for its own device.

A checkpoint may be loaded onto any device, but generator states must be CPU tensors, so
`set_rng_state` brings them back to the CPU first.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import ModelConfig
from .errors import ConfigError, UserError
from .sharded_checkpoint import is_sharded_checkpoint, read_meta


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """`auto` -> out_dir's latest checkpoint if there is one (else start fresh); a path -> that checkpoint
    (a file, a sharded checkpoint folder, or a run folder: its latest). The latest checkpoint is
    checkpoints/latest.pt, or the sharded folder checkpoints/latest/ that runs with FSDP write."""
    if not resume:
        return None
    if resume == "auto":
        return _latest_in(out_dir)
    path = Path(resume)
    if path.is_dir() and not is_sharded_checkpoint(path):
        path = _latest_in(path) or path / "checkpoints" / "latest.pt"
    if not path.exists():
        raise UserError(f"train.resume: checkpoint {path} not found")
    return path


def _latest_in(run_folder: Path) -> Path | None:
    # .latest.previous: a sharded latest/ set aside, when the run stopped before its successor took its name
    checkpoints = run_folder / "checkpoints"
    for latest in (checkpoints / "latest.pt", checkpoints / "latest", checkpoints / ".latest.previous"):
        if latest.is_file() or is_sharded_checkpoint(latest):
            return latest
    return None


def load_resume_checkpoint(resume: str, out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint a run continues from, loaded (None: start fresh), and its path. Of a sharded checkpoint
    only its meta (everything but the tensors) is loaded here.

    With `auto`, a damaged latest.pt (a disk error, a copy cut short) falls back to the
    run's best.pt, with a message (the damaged file stays until the next checkpoint replaces it).
    A damaged checkpoint named explicitly is an error.
    """
    path = find_resume_checkpoint(resume, out_dir)
    if path is None:
        return None
    if path.is_dir():  # a sharded checkpoint: its tensors are loaded into the run's sharded model and optimizer
        return read_meta(path), path
    try:
        return load_checkpoint(path), path
    except UserError as damaged:
        best = path.with_name("best.pt")
        if resume != "auto" or not best.is_file():
            raise
        state = load_checkpoint(best)  # a damaged best.pt too: its own error
        print(f"[{damaged}; resuming from {best} (step {state['step']}) instead; the next checkpoint replaces "
              f"{path.name}]", file=sys.stderr)
        return state, best


def check_same_model(state: dict[str, Any], path: Path, config: ModelConfig, tokenizer: str) -> None:
    """A checkpoint holding another architecture (ModelConfig) or tokenizer than the resuming run's is a
    UserError naming both; how the model computes (attention or loss kernel, dropout) may differ."""
    try:
        saved = ModelConfig.from_dict(state["model_config"])
    except (ConfigError, KeyError) as err:
        raise UserError(f"{path}: bad model_config: {err}") from None
    saved_tokenizer = state.get("tokenizer", "gpt2")
    differences = saved.architecture_differences(config)
    if saved_tokenizer != tokenizer:
        differences.append(f"tokenizer {saved_tokenizer!r} vs {tokenizer!r}")
    if differences:
        raise UserError(f"train.resume: {path} holds another model than this run (checkpoint vs this run: "
                        f"{'; '.join(differences)}); resume with the model it was trained from, or start a new "
                        "run in another train.out_dir")


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random number generator a run on `device` touches, as plain containers and tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved, wherever the checkpoint was loaded; `device` is the resuming run's."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        cuda_state = _own_device_state(state["cuda"], device)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _own_device_state(saved: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The saved CUDA generator state for `device`. Checkpoints written before exact resume kept the
    run's own device only hold a list, one state per GPU the saving process saw."""
    if isinstance(saved, torch.Tensor):
        return saved
    index = device.index if device.index is not None else torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def _as_tuples(value: Any) -> Any:
    """python's random state is nested tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
