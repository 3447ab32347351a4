"""Hugging Face model folders in: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`).

A folder holds `config.json` and the weights: `model.safetensors`, shards listed
in `model.safetensors.index.json`, or the older `pytorch_model.bin` (also
sharded, with `pytorch_model.bin.index.json`).

What differs from our layout:

    GPT-2   `transformer.h.{i}.attn.c_attn` is q, k and v fused into one layer, and
            every GPT-2 linear layer is a `Conv1D`, whose weight is stored
            transposed: (in_features, out_features) where nn.Linear has (out, in).
            Names: wte/wpe (embeddings), ln_1/ln_2/ln_f (norms), c_proj, c_fc.
    Llama   the same tensors as ours under other names (`model.layers.{i}.self_attn.o_proj`
            is our `blocks.{i}.attn.out_proj`); RoPE uses the same rotate-halves
            layout, so no row shuffling is needed. `attention_bias` and `mlp_bias`
            are separate switches; we have one `bias` field, so a model with only
            one of them loads with zero biases in the other part.

The names and the family rules live here; `hf_export.py` writes folders with them.
Both directions are exact: a model loaded and written back gives the same logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..config import ModelConfig
from ..errors import ConfigError, UserError
from ..model import GPT
from .assemble import ModelAssembler

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")

# Our module path inside a block -> the Hugging Face one inside a layer (weights and biases follow).
LLAMA_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
LLAMA_TOP_MODULES = {"tok_emb": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}

# GPT-2, apart from the fused attn.c_attn (our q_proj, k_proj, v_proj).
GPT2_LAYER_MODULES = {
    "attn_norm": "ln_1",
    "attn.out_proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
GPT2_TOP_MODULES = {"tok_emb": "wte", "pos_emb": "wpe", "final_norm": "ln_f"}
GPT2_CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

# Field values that make a model one of the two families transformers can load.
FAMILY_FIELDS = {
    "gpt2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def family_mismatches(config: ModelConfig) -> dict[str, list[str]]:
    """For each family of FAMILY_FIELDS, the fields of `config` that keep it out ("norm=rmsnorm (needs
    layernorm)"); a family with an empty list is the one the model belongs to."""
    return {family: [f"{name}={getattr(config, name)} (needs {value})" for name, value in fields.items()
                     if getattr(config, name) != value]
            for family, fields in FAMILY_FIELDS.items()}  # fmt: skip

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def load_hf_folder(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GPT:
    """A `GPT` with the weights of a Hugging Face GPT-2 or Llama folder, read tensor by tensor.

    safetensors files are memory-mapped: a tensor that needs no conversion (same
    dtype, no transpose) stays a copy-on-write view of the file, so loading costs
    little memory and pages come in as they are used.
    """
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    family, config = config_from_hf(hf_config, folder / "config.json")
    assembler = ModelAssembler(config, str(folder), dtype)
    for key, tensor in iter_hf_tensors(folder):
        for name, converted in hf_tensor_to_ours(family, key, tensor, config, folder):
            assembler.place(name, converted, key)
    zero_biases: list[str] = []
    if family == "llama":  # one `bias` field for two switches: the part whose switch is off gets zero biases
        off = [part for part, key in (("attn", "attention_bias"), ("mlp", "mlp_bias")) if not hf_config.get(key)]
        zero_biases = [name for name in assembler.expected_shapes
                       if name.endswith(".bias") and name.split(".")[2] in off]  # blocks.{i}.{part}.*.bias
    return assembler.finish(zero_if_missing=zero_biases)


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return hf_config


def config_from_hf(hf: dict[str, Any], path: str | os.PathLike[str]) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) for a Hugging Face config; unsupported settings name their key."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        config = _gpt2_config(hf, path) if model_type == "gpt2" else _llama_config(hf, path)
    except ConfigError as err:
        raise UserError(f"{path}: gives an invalid model: {err}") from None
    return model_type, config


def _require(hf: dict[str, Any], key: str, path: str | os.PathLike[str]) -> Any:
    if key not in hf:
        raise UserError(f"{path}: key {key!r} is missing")
    return hf[key]


def _require_int(hf: dict[str, Any], key: str, path: str | os.PathLike[str]) -> int:
    """A key the shape is computed from: present and a positive integer (ModelConfig checks the others)."""
    value = _require(hf, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{path}: {key} must be a positive integer, got {json.dumps(value)}")
    return value


def _refuse(path: str | os.PathLike[str], key: str, value: Any, why: str) -> NoReturn:
    raise UserError(f"{path}: {key} = {json.dumps(value)} is not supported: {why}")


def _gpt2_config(hf: dict[str, Any], path: str | os.PathLike[str]) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_TANH_GELUS:
        _refuse(path, "activation_function", activation, "the MLP uses the tanh-approximated GELU (gelu_new)")
    for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):  # fmt: skip
        if hf.get(key, ours) != ours:
            _refuse(path, key, hf[key], f"only {json.dumps(ours)} has an equivalent here")
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", path),
        context_length=_require(hf, "n_positions", path),
        d_model=_require(hf, "n_embd", path),
        n_layer=_require(hf, "n_layer", path),
        n_head=_require(hf, "n_head", path),
        d_ff=hf.get("n_inner"),  # None = 4 * d_model, as in GPT-2
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pos_emb="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_config(hf: dict[str, Any], path: str | os.PathLike[str]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(path, "hidden_act", hf["hidden_act"], "the SwiGLU MLP uses silu")
    d_model, n_head = _require_int(hf, "hidden_size", path), _require_int(hf, "num_attention_heads", path)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != d_model:
        _refuse(path, "head_dim", head_dim, "it must equal hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", path),
        context_length=hf.get("max_position_embeddings", 2048),
        d_model=d_model,
        n_layer=_require(hf, "num_hidden_layers", path),
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_ff=_require(hf, "intermediate_size", path),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        pos_emb="rope",
        rope_theta=_llama_rope_theta(hf, path),
        mlp="swiglu",
        bias=bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False)),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _llama_rope_theta(hf: dict[str, Any], path: str | os.PathLike[str]) -> float:
    """RoPE's base frequency; any rope scaling (linear, dynamic, yarn, llama3, ...) is refused."""
    # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` and `rope_scaling`.
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            _refuse(path, key, value, "expected an object")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            _refuse(path, f"{key}.rope_type", rope_type, "only plain RoPE without scaling is implemented")
    parameters = hf.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        _refuse(path, "rope_theta", theta, "expected a number")
    return float(theta)


def iter_hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) in the folder's weight files, one at a time."""
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            yield from _read_safetensors(file)
        else:
            yield from _read_torch_file(file)


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards_of_index(folder / index)
    raise UserError(
        f"{folder}: no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _shards_of_index(index_path: Path) -> list[Path]:
    """The shard files an index's `weight_map` (tensor name -> file name) points to, in order."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise UserError(f"{index_path}: expected JSON with a 'weight_map' object ({problem})") from None
    shards = [index_path.parent / name for name in shard_names]
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{index_path}: lists shard {shard.name}, which is missing")
    return shards


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    safetensors = import_safetensors()
    try:
        with safetensors.safe_open(file, framework="pt") as f:  # memory-mapped; each tensor a copy-on-write view
            for key in f.keys():
                yield key, f.get_tensor(key)
    except safetensors.SafetensorError as err:
        raise UserError(f"{file}: not a readable safetensors file ({err})") from None


def _read_torch_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A pytorch_model.bin, memory-mapped (copy-on-write) when saved in the zip format (PyTorch >= 1.6)."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as err:  # torch.load raises many kinds for a foreign or damaged file
        raise UserError(f"{file}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    for key in list(state):
        tensor = state.pop(key)  # dropped from the dict so a converted tensor's source can be freed
        if isinstance(tensor, torch.Tensor):
            yield key, tensor


def import_safetensors() -> Any:
    try:
        import safetensors
        import safetensors.torch
    except ImportError as err:
        raise UserError("Hugging Face weights need the safetensors package: pip install safetensors") from err
    return safetensors


def _split_key(key: str, layer_prefix: str) -> tuple[int | None, str, str]:
    """'h.3.attn.c_proj.weight' -> (3, 'attn.c_proj', 'weight'); a key outside the layers -> (None, module, leaf)."""
    module, _, leaf = key.rpartition(".")
    if module.startswith(layer_prefix):
        index, _, inner = module[len(layer_prefix):].partition(".")
        if index.isdigit():
            return int(index), inner, leaf
    return None, module, leaf


def hf_tensor_to_ours(
    family: str, key: str, tensor: torch.Tensor, config: ModelConfig, source: Path
) -> list[tuple[str, torch.Tensor]]:
    """One Hugging Face tensor as (our name, tensor) pairs: none (a buffer to skip), one, or three (c_attn)."""
    if family == "gpt2":
        return _gpt2_tensor_to_ours(key, tensor, config, source)
    return _llama_tensor_to_ours(key, tensor, config, source)


def _unknown(source: Path, key: str) -> UserError:
    return UserError(f"{source}: tensor {key} is not part of a model this loader knows")


def _llama_tensor_to_ours(
    key: str, tensor: torch.Tensor, config: ModelConfig, source: Path
) -> list[tuple[str, torch.Tensor]]:
    layer, module, leaf = _split_key(key, "model.layers.")
    if module.endswith("rotary_emb"):  # inv_freq, saved by old versions: we derive it from rope_theta
        return []
    if layer is None:
        ours = {hf: our for our, hf in LLAMA_TOP_MODULES.items()}.get(module)
        if ours == "lm_head" and config.tie_embeddings:
            return []  # the tied head is the embedding
    else:
        inner = {hf: our for our, hf in LLAMA_LAYER_MODULES.items()}.get(module)
        ours = f"blocks.{layer}.{inner}" if inner else None
    if ours is None:
        raise _unknown(source, key)
    return [(f"{ours}.{leaf}", tensor)]


def _gpt2_tensor_to_ours(
    key: str, tensor: torch.Tensor, config: ModelConfig, source: Path
) -> list[tuple[str, torch.Tensor]]:
    # The original checkpoints name tensors without the "transformer." prefix that transformers writes today.
    layer, module, leaf = _split_key(key.removeprefix("transformer."), "h.")
    if layer is None:
        if module == "lm_head":
            return [] if config.tie_embeddings else [("lm_head.weight", tensor)]
        ours = {hf: our for our, hf in GPT2_TOP_MODULES.items()}.get(module)
        if ours is None:
            raise _unknown(source, key)
        return [(f"{ours}.{leaf}", tensor)]

    if module == "attn" and leaf in ("bias", "masked_bias"):  # causal-mask buffers in old checkpoints
        return []
    if module in GPT2_CONV1D_MODULES and leaf == "weight":
        tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
    prefix = f"blocks.{layer}."
    if module == "attn.c_attn":
        d = config.d_model
        if tensor.shape[0] != 3 * d:
            raise UserError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, but n_embd = {d} needs "
                f"{3 * d} fused q, k, v outputs"
            )
        q, k, v = (part.clone(memory_format=torch.contiguous_format) for part in tensor.split(d, dim=0))  # (d, ...)
        return [(f"{prefix}attn.{proj}.{leaf}", part) for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))]
    inner = {hf: our for our, hf in GPT2_LAYER_MODULES.items()}.get(module)
    if inner is None:
        raise _unknown(source, key)
    return [(f"{prefix}{inner}.{leaf}", tensor)]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    by_name = {name: dt for dt, name in DTYPE_NAMES.items()}
    if dtype not in by_name:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(by_name)}")
    return by_name[dtype]
