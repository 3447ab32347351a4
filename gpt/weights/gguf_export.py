"""GGUF files (llama.cpp's format) out: `python -m gpt convert M --to gguf --type f32|f16|q8_0|q4_0`.

The file is written with the `gguf` package's `GGUFWriter`; Q8_0 and Q4_0 blocks
come from its `gguf.quants.quantize`. What goes in, and why:

Architecture and tensor names (the tables live in `gguf.py`, shared with the reader)

    our GPT-2 family  -> `gpt2`:  token_embd, position_embd, output_norm (+ .bias), output,
                                   blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}
                                   each with .weight and .bias (llama.cpp requires all of them: a model
                                   trained without biases gets zero biases); attn_qkv is q, k and v
                                   stacked by rows, as GPT-2's fused `c_attn` is.
    our Llama family  -> `llama`: token_embd, output_norm, output,
                                   blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
                                   ffn_gate, ffn_up, ffn_down}, plus .bias tensors when the model has them.

A tied model (LM head = token embedding) has no `output.weight`; llama.cpp and
transformers then use `token_embd.weight` for both. A model mixing the families
(say RoPE with LayerNorm) has no GGUF architecture and is refused.

Dimension order: GGUF lists a tensor's dimensions innermost first, so our (out, in)
weight is described as [in, out]. `GGUFWriter` reverses the numpy shape itself; a
quantized tensor is handed over as its raw bytes, whose shape it converts back.

Rotary rows: our RoPE rotates the halves of a head (dimension i with i + head_dim/2),
llama.cpp rotates adjacent pairs (2i, 2i+1). llama.cpp's converter therefore reorders
the rows of Q and K within each head (K per key/value head): row i + half * head_dim/2
goes to row 2i + half. `permute_rotary_rows` does that; it is the inverse of
`unpermute_rotary_rows` in `gguf.py`.

Which tensors are quantized (llama.cpp's convention, from its convert_hf_to_gguf.py
and llama-quantize):
    * 1-D tensors (norm gains, biases) and `position_embd` stay F32;
    * every other 2-D weight, token_embd and output included, gets the chosen type;
    * q4_0: llama-quantize keeps the LM head (`output`, or `token_embd` when tied) at
      Q6_K; the gguf package cannot write Q6_K, so we keep it at Q8_0, the next type up
      it can write (and llama-quantize's own fallback for Q6_K);
    * a weight whose rows are not a whole number of 32-value blocks falls back to F16
      with a warning, as the converter does.

Tokenizer metadata (`tokenizer.*`), from one of two sources:
    * GPT-2's bundled ranks (`gpt/assets/gpt2.tiktoken`): `tokenizer.ggml.model` "gpt2",
      `tokenizer.ggml.pre` "gpt-2" (llama.cpp's name for GPT-2's pre-tokenizer), the
      50257 tokens in the byte alphabet (`<|endoftext|>` last, a control token), the
      merges derived from the ranks (`tokenizer_files.gpt2_vocabulary`), bos = eos =
      unknown = 50256, and `add_bos_token` false (GPT-2 prompts start without it);
    * a GGUF file (a GGUF source, or the GGUF tokenizer a checkpoint names): every
      `tokenizer.*` key copied as it is, chat template included.
Rows of the embedding beyond the tokenizer's vocabulary get placeholder tokens
`[PAD{id}]` of type UNUSED, as llama.cpp's converter writes them.

The file is written to a temporary name beside the target and renamed when complete
(`gpt.files.atomic_target`): a failed export leaves no truncated .gguf behind.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import UserError
from ..files import atomic_target
from ..gguf_file import import_gguf, metadata_array, metadata_value, open_gguf
from ..model import GPT
from .gguf import GGUF_LAYER_MODULES, GGUF_TOP_MODULES, GPT2_QKV
from .hf import family_mismatches
from .tokenizer_files import GPT2_EOT, gpt2_vocabulary

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
QK = 32  # values per Q8_0 / Q4_0 block, along a weight's rows

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
# Per-token arrays of a tokenizer, padded when the model has more embedding rows than tokens.
PER_TOKEN_KEYS = {"tokenizer.ggml.tokens": None, "tokenizer.ggml.token_type": TOKEN_UNUSED,
                  "tokenizer.ggml.scores": 0.0}  # fmt: skip


@dataclass
class MetadataEntry:
    """One GGUF key-value pair with its GGUF value type (and the item type of an array)."""

    key: str
    value: Any
    vtype: Any  # gguf.GGUFValueType
    sub_type: Any = None


@dataclass
class ExportedGGUF:
    """What `write_gguf` wrote: the path, the architecture, and how many tensors went in each storage type."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]
    size_bytes: int


def gguf_architecture(config: ModelConfig) -> str:
    """'gpt2' or 'llama', or a UserError naming the fields that keep the model out of both."""
    mismatches = family_mismatches(config)
    family = next((family for family, wrong in mismatches.items() if not wrong), None)
    if family is None:
        wrong = "; ".join(f"as {f}: {', '.join(w)}" for f, w in mismatches.items())
        raise UserError(f"this model matches no GGUF architecture llama.cpp runs: {wrong}")
    if family == "gpt2" and config.n_kv_head != config.n_head:
        raise UserError(
            f"model.n_kv_head = {config.n_kv_head} (grouped-query attention) cannot be written as GGUF "
            f"architecture gpt2, which has plain multi-head attention (n_kv_head == n_head = {config.n_head})"
        )
    return family


def check_gguf_type(gguf_type: str) -> str:
    """`gguf_type` if it is one of GGUF_TYPES, else a UserError naming it."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(
            f"--type {gguf_type!r} is not a GGUF type this exporter writes; use one of {', '.join(GGUF_TYPES)}"
        )
    return gguf_type


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: per head, row i + half * head_dim/2 goes to row 2i + half.

    `weight` is (n_heads * head_dim, ...) (a weight or a bias); the result has the same shape.
    """
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])  # (head, half, i, ...)
    return grouped.transpose(1, 2).reshape(weight.shape)  # (head, i, half, ...) flattened


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters under their GGUF names (torch layout, float), for the model's architecture."""
    config = model.config
    arch = gguf_architecture(config)
    params = dict(model.named_parameters())  # a tied head appears once, as tok_emb.weight
    if arch == "gpt2":  # every bias is required: a model without them gets zeros
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                params.setdefault(f"{name}.bias", torch.zeros(module.weight.shape[0]))
    tensors = {}
    for name, param in params.items():
        module, _, leaf = name.rpartition(".")
        param = param.detach().float()
        if not module.startswith("blocks."):
            tensors[f"{GGUF_TOP_MODULES[module]}.{leaf}"] = param
            continue
        _, layer, inner = module.split(".", 2)
        if arch == "gpt2" and inner in ("attn.k_proj", "attn.v_proj"):
            continue  # stacked into attn_qkv with q_proj
        if arch == "gpt2" and inner == "attn.q_proj":
            parts = [params[f"blocks.{layer}.attn.{p}.{leaf}"].detach().float() for p in ("q_proj", "k_proj", "v_proj")]
            tensors[f"blk.{layer}.{GPT2_QKV}.{leaf}"] = torch.cat(parts)  # (3 * D, D) weight or (3 * D,) bias
            continue
        if inner == "attn.q_proj":
            param = permute_rotary_rows(param, config.n_head)
        elif inner == "attn.k_proj":
            param = permute_rotary_rows(param, config.n_kv_head)
        tensors[f"blk.{layer}.{GGUF_LAYER_MODULES[arch][inner]}.{leaf}"] = param
    return tensors


def storage_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str, tied: bool) -> str:
    """The GGML type name a tensor is stored as (llama.cpp's convention, see the module docstring)."""
    if len(shape) < 2 or not gguf_name.endswith(".weight") or gguf_name.startswith("position_embd."):
        return "F32"
    if gguf_type in ("f32", "f16"):
        return gguf_type.upper()
    if shape[-1] % QK != 0:
        return "F16"  # no whole blocks: the converter's fallback
    is_head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if gguf_type == "q4_0" and is_head:
        return "Q8_0"  # llama-quantize's Q6_K, which the gguf package cannot write
    return gguf_type.upper()


def gpt2_tokenizer_metadata(vocab_size: int) -> list[MetadataEntry]:
    """GPT-2's tokenizer (the bundled ranks) as `tokenizer.*` entries, padded to `vocab_size` tokens."""
    gguf = import_gguf()
    vocab, merges = gpt2_vocabulary()
    tokens = sorted(vocab, key=vocab.__getitem__) + [GPT2_EOT]  # GPT-2's ids are its ranks; EOT is 50256
    eot_id = len(tokens) - 1
    token_types = [TOKEN_NORMAL] * eot_id + [TOKEN_CONTROL]
    tokens, token_types = _pad_tokens(tokens, token_types, vocab_size)
    T = gguf.GGUFValueType
    return [
        MetadataEntry("tokenizer.ggml.model", "gpt2", T.STRING),
        MetadataEntry("tokenizer.ggml.pre", "gpt-2", T.STRING),
        MetadataEntry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        MetadataEntry("tokenizer.ggml.token_type", token_types, T.ARRAY, T.INT32),
        MetadataEntry("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        MetadataEntry("tokenizer.ggml.bos_token_id", eot_id, T.UINT32),
        MetadataEntry("tokenizer.ggml.eos_token_id", eot_id, T.UINT32),
        MetadataEntry("tokenizer.ggml.unknown_token_id", eot_id, T.UINT32),
        MetadataEntry("tokenizer.ggml.add_bos_token", False, T.BOOL),
    ]


def gguf_tokenizer_metadata(gguf_path: Path, vocab_size: int) -> list[MetadataEntry]:
    """Every `tokenizer.*` key of a GGUF file, as stored (per-token arrays padded to `vocab_size` tokens)."""
    gguf = import_gguf()
    reader = open_gguf(gguf_path)
    entries = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            value = metadata_array(reader, key)
            entries.append(MetadataEntry(key, value, field.types[0], field.types[-1]))
        else:
            entries.append(MetadataEntry(key, metadata_value(reader, key), field.types[0]))
    by_key = {entry.key: entry for entry in entries}
    if "tokenizer.ggml.tokens" not in by_key:
        raise UserError(f"{gguf_path}: no tokenizer.ggml.tokens, so there is no tokenizer to copy")
    n_tokens = len(by_key["tokenizer.ggml.tokens"].value)
    if n_tokens > vocab_size:
        raise UserError(f"{gguf_path}'s tokenizer has {n_tokens} tokens but the model only {vocab_size} "
                        "embedding rows; export the model with its own tokenizer")
    for key, fill in PER_TOKEN_KEYS.items():
        if key in by_key:
            values = by_key[key].value
            by_key[key].value = values + [f"[PAD{i}]" if fill is None else fill for i in range(len(values), vocab_size)]
    return entries


def _pad_tokens(tokens: list[str], token_types: list[int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types extended with unused `[PAD{id}]` tokens up to `vocab_size`."""
    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows")
    padding = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in padding], token_types + [TOKEN_UNUSED] * len(padding)


def write_gguf(
    model: GPT,
    out_path: str | os.PathLike[str],
    gguf_type: str,
    tokenizer: list[MetadataEntry],
    name: str,
) -> ExportedGGUF:
    """Write `model` as a GGUF file of `gguf_type` (f32, f16, q8_0, q4_0) with the given tokenizer metadata.

    The file appears under `out_path` only once it is complete.
    """
    gguf = import_gguf()
    check_gguf_type(gguf_type)
    config = model.config
    arch = gguf_architecture(config)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder; give the path of the .gguf file to write")

    tensors = gguf_tensors(model)
    planned = {gguf_name: storage_type(gguf_name, tuple(t.shape), gguf_type, config.tie_embeddings)
               for gguf_name, t in tensors.items()}  # fmt: skip
    fallbacks = [n for n, t in planned.items() if t == "F16" and gguf_type.startswith("q")]
    if fallbacks:
        print(f"warning: {len(fallbacks)} weights have rows of a length not divisible by {QK} "
              f"({', '.join(fallbacks[:3])}{', ...' if len(fallbacks) > 3 else ''}); stored as F16", file=sys.stderr)
    size_hint = sum(t.numel() * 4 for t in tensors.values())

    with atomic_target(out_path, size_hint=size_hint) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_model_metadata(writer, config, arch, gguf_type, name)
        for entry in tokenizer:
            writer.add_key_value(entry.key, entry.value, entry.vtype, entry.sub_type)
        for gguf_name, tensor in tqdm(tensors.items(), desc=f"quantizing to {gguf_type}", unit="tensor",
                                      disable=gguf_type in ("f32", "f16")):  # fmt: skip
            qtype = getattr(gguf.GGMLQuantizationType, planned[gguf_name])
            array = gguf.quants.quantize(np.ascontiguousarray(tensor.numpy(), dtype=np.float32), qtype)
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)  # quantized: bytes (rows, row bytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
    counts: dict[str, int] = {}
    for qtype_name in planned.values():
        counts[qtype_name] = counts.get(qtype_name, 0) + 1
    return ExportedGGUF(out_path, arch, counts, out_path.stat().st_size)


def _add_model_metadata(writer: Any, config: ModelConfig, arch: str, gguf_type: str, name: str) -> None:
    """general.* and the {arch}.* hyperparameters llama.cpp reads."""
    gguf = import_gguf()
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}  # fmt: skip
    writer.add_name(name)
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_head)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
