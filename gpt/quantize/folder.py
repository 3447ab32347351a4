"""A quantized model on disk: one folder that every verb loads with `--model DIR`.

    DIR/quantization.json   what the folder is: format marker, scheme, model config, tokenizer, source
    DIR/model.safetensors   the state_dict: float tensors (embeddings, norms, biases) and, per quantized
                            layer, its codes and scales (`...q_proj.qweight`, `...q_proj.scales`, or for
                            int4 `...codes`, `...scales`, `...zeros`)

The tokenizer is recorded by name as our checkpoints record it ("gpt2", a known model
name, or the GGUF file it came from). Loading builds the model's shapes from the config
on the meta device (no float weights are ever allocated), swaps in quantized layers of
the recorded scheme, and hands them the file's tensors. Both
files are written atomically, the JSON last, so a folder without it is incomplete and
is not taken for a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, UserError
from ..files import atomic_target, write_json
from ..model import GPT
from .formats import layer_group_size
from .linear import Int4Linear, Int8Linear
from .model import BLOCK_PROJECTIONS, QuantScheme, weight_bytes

FORMAT = "gpt-quantized"
VERSION = 1
MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def save_quantized(model: GPT, out_dir: Path, scheme: QuantScheme, tokenizer: str, source: str) -> None:
    """Write a quantized `model` (from `quantize_model`) as `out_dir`, weights first, the manifest last."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_target(out_dir / WEIGHTS, size_hint=size) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT, "version": VERSION, "scheme": scheme.to_dict(),
        "quantized_head": not isinstance(model.lm_head, torch.nn.Linear),
        "model_config": model.config.to_dict(), "tokenizer": tokenizer, "source": source,
        "weight_bytes": weight_bytes(model),
    }  # fmt: skip
    write_json(out_dir / MANIFEST, manifest, indent=2)


def load_quantized(folder: Path) -> tuple[GPT, str]:
    """(model in eval mode, tokenizer name) from a folder `save_quantized` wrote."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    scheme = QuantScheme(**manifest["scheme"])
    with torch.device("meta"):  # shapes only: the float model is never built in memory
        model = GPT(ModelConfig.from_dict(manifest["model_config"]))
        _swap_in_empty_layers(model, scheme, manifest["quantized_head"])
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{folder / WEIGHTS}: not a readable safetensors file ({err})") from None
    own = model.state_dict()
    if model.config.tie_embeddings and "lm_head.weight" in own:
        tensors["lm_head.weight"] = tensors.get("tok_emb.weight")  # stored once; tied again on load
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"{folder / WEIGHTS}: tensors do not fit the model in {MANIFEST}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
            raise UserError(f"{folder / WEIGHTS}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                            f"the model expects {tuple(own[name].shape)} {own[name].dtype}")
    model.load_state_dict(tensors, assign=True)  # the loaded tensors become the model's, no copy
    if model.config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    model.reset_rope_tables("cpu")
    return model.eval(), manifest["tokenizer"]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a quantized model (no '{FORMAT}' format marker)")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: version {manifest.get('version')!r}; this gpt reads version {VERSION}")
    for key in ("scheme", "quantized_head", "model_config", "tokenizer"):
        if key not in manifest:
            raise UserError(f"{path}: missing key {key!r}")
    try:
        ModelConfig.from_dict(manifest["model_config"])
        QuantScheme(**manifest["scheme"])
    except (ConfigError, TypeError) as err:
        raise UserError(f"{path}: bad model_config or scheme: {err}") from None
    return manifest


def _tensors_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The state_dict, each tensor contiguous, a tied float head left out (it is the embedding)."""
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        tensors.pop("lm_head.weight")
    return tensors


def _swap_in_empty_layers(model: GPT, scheme: QuantScheme, quantized_head: bool) -> None:
    """Replace the layers `quantize_model` would have replaced by zero-filled quantized layers of the same shape."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if name in BLOCK_PROJECTIONS]
    if quantized_head:
        targets.append((model, "lm_head", model.lm_head))
    for parent, name, linear in targets:
        has_bias = linear.bias is not None
        if scheme.format == "int8":
            empty = Int8Linear.empty(linear.in_features, linear.out_features, has_bias)
        else:
            group_size = layer_group_size(linear.in_features, scheme.group_size)
            empty = Int4Linear.empty(linear.in_features, linear.out_features, has_bias, group_size)
        setattr(parent, name, empty)
