"""GGUF files (llama.cpp's format) in: the `llama` and `gpt2` architectures, dequantized to float.

A GGUF file holds key-value metadata and tensors. The model's shape comes from
the `{arch}.*` keys (`llama.block_count`, `gpt2.embedding_length`, ...), the
vocabulary size from the length of `tokenizer.ggml.tokens`. Tensors are read
through the `gguf` package, which also dequantizes them (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_x, the k-quants, ...); weights come out in float32.

`llama` is our Llama family (RMSNorm, RoPE, SwiGLU), `gpt2` our GPT-2 family
(LayerNorm with biases, learned positions `position_embd`, GELU MLP). A gpt2
file stores q, k and v as one fused `attn_qkv` tensor (rows q, then k, then v),
which the loader splits. These name tables are shared with the writer
(`gguf_export.py`).

Three things differ from our layout:

* GGUF lists a tensor's dimensions innermost first, so a (out, in) weight is
  described as [in, out]: we reverse the list to get the torch shape.
* llama.cpp's converter reorders the rows of the Q and K projections. Within
  each head, we pair dimension i with dimension i + head_dim/2 (rotate halves);
  llama.cpp rotates adjacent rows (2i, 2i+1) instead, so its converter moves row
  i + half*head_dim/2 of a head to row 2i + half. `unpermute_rotary_rows` moves
  them back. (K is permuted per key/value head.)
* Without an `output.weight` tensor the LM head is the token embedding (tied).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ConfigError, UserError
from ..gguf_file import array_length, import_gguf, metadata_value, open_gguf
from ..model import GPT
from .assemble import ModelAssembler

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")

# Our module path inside a block -> the GGUF tensor name inside `blk.{i}.`, per architecture.
GGUF_LAYER_MODULES = {
    "llama": {
        "attn_norm": "attn_norm",
        "attn.q_proj": "attn_q",
        "attn.k_proj": "attn_k",
        "attn.v_proj": "attn_v",
        "attn.out_proj": "attn_output",
        "mlp_norm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
    "gpt2": {  # q, k and v are the fused GPT2_QKV tensor
        "attn_norm": "attn_norm",
        "attn.out_proj": "attn_output",
        "mlp_norm": "ffn_norm",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
}
GPT2_QKV = "attn_qkv"
GGUF_TOP_MODULES = {"tok_emb": "token_embd", "pos_emb": "position_embd", "final_norm": "output_norm",
                    "lm_head": "output"}  # fmt: skip


def config_from_gguf(reader: Any, path: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` a GGUF file's metadata describes; unsupported settings name their key."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{path}: general.architecture is {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        """The value of `{arch}.{key}` (a number, but for the RoPE scaling type), or `default` when absent."""
        value = metadata_value(reader, f"{arch}.{key}")
        if value is None:
            return default
        if key != "rope.scaling.type" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: metadata key {arch}.{key} must be a number, got {value!r}")
        return value

    def require(key: str) -> Any:
        value = get(key)
        if value is None:
            raise UserError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    if get("expert_count", 0) > 0:
        raise UserError(f"{path}: {arch}.expert_count = {get('expert_count')}: mixture-of-experts is not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise UserError(f"{path}: {arch}.rope.scaling.type = {scaling!r}: only plain RoPE without scaling is supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE scaling) is not supported")

    d_model, n_head = require("embedding_length"), require("attention.head_count")
    head_dim = d_model // n_head if n_head > 0 else 0  # ModelConfig rejects a bad head count below
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise UserError(
                f"{path}: {arch}.{key} = {get(key)}, but this model needs embedding_length / head_count = {head_dim}"
            )

    tensor_names = {t.name for t in reader.tensors}
    vocab_size = array_length(reader, "tokenizer.ggml.tokens") or get("vocab_size")
    if vocab_size is None:  # no token list: the embedding has one row per token
        embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embedding is None:
            raise UserError(f"{path}: neither tokenizer.ggml.tokens nor tensor token_embd.weight is present")
        vocab_size = int(embedding.shape[-1])
    if arch == "llama":
        family = dict(norm="rmsnorm", norm_eps=require("attention.layer_norm_rms_epsilon"), pos_emb="rope",
                      rope_theta=get("rope.freq_base", 10000.0), mlp="swiglu",
                      bias=any(name.startswith("blk.") and name.endswith(".bias") for name in tensor_names))
    else:  # gpt2: llama.cpp requires every bias of this architecture
        family = dict(norm="layernorm", norm_eps=require("attention.layer_norm_epsilon"), pos_emb="learned",
                      mlp="gelu", bias=True)
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            context_length=require("context_length"),
            d_model=d_model,
            n_layer=require("block_count"),
            n_head=n_head,
            n_kv_head=get("attention.head_count_kv", n_head),
            d_ff=require("feed_forward_length"),
            tie_embeddings="output.weight" not in tensor_names,
            **family,
        )
    except ConfigError as err:
        raise UserError(f"{path}: the metadata gives an invalid model: {err}") from None


def load_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GPT:
    """A `GPT` with the dequantized weights of a llama- or gpt2-architecture GGUF file, read tensor by tensor."""
    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    arch = metadata_value(reader, "general.architecture")
    assembler = ModelAssembler(config, str(path), dtype)
    for tensor in reader.tensors:
        weight = dequantize(tensor, path)
        if arch == "gpt2" and tensor.name.split(".")[2:3] == [GPT2_QKV]:
            _, layer, _, leaf = tensor.name.split(".")
            q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
            if weight.shape[0] != q_rows + 2 * kv_rows:
                raise UserError(f"{path}: tensor {tensor.name} has {weight.shape[0]} rows; "
                                f"q, k and v of this model need {q_rows + 2 * kv_rows}")
            for module, part in zip(("q_proj", "k_proj", "v_proj"), weight.split([q_rows, kv_rows, kv_rows])):
                assembler.place(f"blocks.{layer}.attn.{module}.{leaf}", part, tensor.name)
            continue
        name = our_tensor_name(tensor.name, arch, path)
        if name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            weight = unpermute_rotary_rows(weight, config.n_head)
        elif name.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
            weight = unpermute_rotary_rows(weight, config.n_kv_head)
        assembler.place(name, weight, tensor.name)
    # Files with biases usually have them only in attention: the others are zero.
    zero_biases = [name for name in assembler.expected_shapes if name.endswith(".bias")]
    return assembler.finish(zero_if_missing=zero_biases)


def our_tensor_name(gguf_name: str, arch: str, path: Path) -> str:
    """'blk.3.attn_q.weight' -> 'blocks.3.attn.q_proj.weight' (the names of architecture `arch`)."""
    module, _, leaf = gguf_name.rpartition(".")
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        inner = {g: our for our, g in GGUF_LAYER_MODULES[arch].items()}.get(parts[2])
        if inner is not None:
            return f"blocks.{parts[1]}.{inner}.{leaf}"
    else:
        ours = {g: our for our, g in GGUF_TOP_MODULES.items()}.get(module)
        if ours is not None:
            return f"{ours}.{leaf}"
    raise UserError(f"{path}: tensor {gguf_name} is not part of a {arch} model this loader knows")


def dequantize(tensor: Any, path: Path) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor in torch's dimension order."""
    gguf = import_gguf()
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, "
            "which the installed gguf package cannot dequantize"
        ) from None
    array = array.reshape(shape)
    # Unquantized F32 comes back as a read-only view of the mapped file: copy it into memory of our own.
    return torch.from_numpy(array.astype(np.float32, copy=not array.flags.writeable))


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, row 2i + half goes back to row i + half * head_dim/2.

    `weight` is (n_heads * head_dim, ...) (a weight or a bias); the result has the same shape.
    """
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])  # (head, i, half, ...)
    return grouped.transpose(1, 2).reshape(weight.shape)  # (head, half, i, ...) flattened
