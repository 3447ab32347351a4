"""`load_pretrained`: one entry point for every kind of model source (see `gpt/weights/__init__.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint_path
from ..config import PRESETS, ModelConfig
from ..errors import UserError
from ..fetch import KNOWN_MODELS, resolve_model
from ..model import GPT
from ..tokenizer import Tokenizer, get_tokenizer
from ..gguf_file import is_gguf_file
from ..quantize.folder import is_quantized_folder, load_quantized, read_manifest
from .gguf import load_gguf
from .hf import config_from_hf, load_hf_folder, read_hf_config, resolve_dtype


def load_pretrained(path: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float32) -> GPT:
    """A `GPT` in eval mode from a Hugging Face folder, a GGUF file, our checkpoint or quantized folder, or a known
    model name.

    Weights are converted to `dtype` (float32 by default, whatever the file stores).
    """
    dtype = resolve_dtype(dtype)
    kind, path = source_kind(path)
    if kind == "gguf":
        return load_gguf(path, dtype)
    if kind == "hf":
        return load_hf_folder(path, dtype)
    if kind == "quantized":
        if dtype != torch.float32:
            raise UserError(f"{path}: a quantized model loads as it was saved; dtype {dtype} does not apply")
        return load_quantized(path)[0]
    model = model_from_checkpoint(load_checkpoint(path), path)
    return model.to(dtype).eval()


def source_kind(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """What `path` holds: ("gguf", file), ("hf", folder), ("quantized", folder) or ("checkpoint", file).

    A path that does not exist may be a known model name (`gpt.fetch`), fetched on first use.
    """
    path = Path(path).expanduser()
    if not path.exists():  # perhaps a known model name: fetched here (with a message) if not cached yet
        path = resolve_model(str(path))
    if path.is_dir():
        if is_quantized_folder(path):
            return "quantized", path
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
    if path.suffix.lower() == ".gguf":
        raise UserError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    if path.name == "config.json" or path.suffix == ".safetensors":
        return "hf", path.parent  # a file inside a Hugging Face folder stands for the folder
    return "checkpoint", path


@dataclass
class LoadedModel:
    """A model with the tokenizer it was trained with, for the scripts and verbs that take `--model`."""

    model: GPT
    tokenizer: Tokenizer
    tokenizer_name: str  # what a checkpoint records to find this tokenizer again ("gpt2", a GGUF path or name)
    description: str


def is_preset_name(source: str) -> bool:
    """Whether `source` names a preset (tiny, gpt2-124m, ...) rather than a known model or a path."""
    return source in PRESETS and source not in KNOWN_MODELS and not Path(source).expanduser().exists()


def load_model_and_tokenizer(source: str, *, seed: int = 0) -> LoadedModel:
    """`source` is a known model name, a GGUF file, a Hugging Face folder, our checkpoint or run folder,
    or a preset name (a random-init model with the GPT-2 tokenizer, e.g. to train from scratch)."""
    if is_preset_name(source):
        torch.manual_seed(seed)
        model = GPT(ModelConfig.preset(source))
        return LoadedModel(model, get_tokenizer("gpt2"), "gpt2", f"{source} preset, random init")
    kind, path = source_kind(source)  # a known name is fetched here on first use, with a message
    if kind == "gguf":
        tokenizer_name = source if source in KNOWN_MODELS else str(path.resolve())
    elif kind == "checkpoint":
        tokenizer_name = load_checkpoint(path).get("tokenizer", "gpt2")
    elif kind == "quantized":
        tokenizer_name = read_manifest(path)["tokenizer"]
    else:
        model_type, _ = config_from_hf(read_hf_config(path), path / "config.json")  # a bad config.json stops here
        if model_type != "gpt2":
            raise UserError(f"{path}: no tokenizer support for Hugging Face {model_type!r} folders yet; "
                            "use the model's GGUF file, or a GPT-2 folder")
        tokenizer_name = "gpt2"
    model, tokenizer = load_pretrained(path), get_tokenizer(tokenizer_name)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                        f"{model.config.vocab_size}; load this model with its own tokenizer")
    return LoadedModel(model, tokenizer, tokenizer_name, f"{source} ({kind}: {path})")
