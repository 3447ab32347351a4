"""`load_pretrained`: one entry point for every kind of model source (see `gpt/weights/__init__.py`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint_path
from ..errors import UserError
from ..model import GPT
from .gguf import is_gguf_file, load_gguf
from .hf import load_hf_folder, resolve_dtype


def load_pretrained(path: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float32) -> GPT:
    """A `GPT` in eval mode from a Hugging Face folder, a GGUF file, our checkpoint, or a known model name.

    Weights are converted to `dtype` (float32 by default, whatever the file stores).
    """
    dtype = resolve_dtype(dtype)
    kind, path = source_kind(path)
    if kind == "gguf":
        return load_gguf(path, dtype)
    if kind == "hf":
        return load_hf_folder(path, dtype)
    model = model_from_checkpoint(load_checkpoint(path), path)
    return model.to(dtype).eval()


def source_kind(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """What `path` holds: ("gguf", file), ("hf", folder) or ("checkpoint", file).

    A path that does not exist may be a known model name (`gpt.fetch`), fetched on first use.
    """
    path = Path(path).expanduser()
    if not path.exists():
        from ..fetch import resolve_model  # network access only for a known name that is not cached yet

        path = resolve_model(str(path))
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            return "checkpoint", resolve_checkpoint_path(path)
        if (path / "config.json").is_file():
            return "hf", path
        try:
            return "checkpoint", resolve_checkpoint_path(path)
        except UserError:
            raise UserError(
                f"{path}: not a model folder: no config.json (a Hugging Face model) "
                "and no checkpoints/best.pt or latest.pt (a run folder)"
            ) from None
    if is_gguf_file(path):
        return "gguf", path
    if path.name == "config.json" or path.suffix == ".safetensors":
        return "hf", path.parent  # a file inside a Hugging Face folder stands for the folder
    return "checkpoint", path
