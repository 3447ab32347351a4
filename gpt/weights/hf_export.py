"""Hugging Face model folders out: `save_pretrained` writes a folder transformers loads.

GPT-2-family models become `GPT2LMHeadModel` (q, k and v fused into `c_attn`, every
weight transposed for `Conv1D`), Llama-family ones `LlamaForCausalLM` (the same
tensors under Llama's names); the name tables are in `hf.py`, shared with the reader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import UserError
from ..files import atomic_target, write_json
from ..model import GPT
from .hf import (
    DTYPE_NAMES,
    HF_CLASS,
    LLAMA_LAYER_MODULES,
    LLAMA_TOP_MODULES,
    family_mismatches,
    import_safetensors,
    resolve_dtype,
)


def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama': the transformers architecture this config maps onto, or a UserError saying why none."""
    mismatches = family_mismatches(config)
    family = next((family for family, wrong in mismatches.items() if not wrong), None)
    if family is None:
        raise UserError(
            "this model has no transformers equivalent: fields model.pos_emb, model.norm and model.mlp must all "
            "match one family; " + "; ".join(f"as {HF_CLASS[f]}: {', '.join(w)}" for f, w in mismatches.items())
        )
    if family == "gpt2" and config.n_kv_head != config.n_head:
        raise UserError(
            f"model.n_kv_head = {config.n_kv_head} (grouped-query attention) has no equivalent in "
            f"GPT2LMHeadModel, which needs n_kv_head == n_head ({config.n_head})"
        )
    return family


def save_pretrained(
    model: GPT,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.AutoModelForCausalLM` loads.

    GPT-2-family models (learned positions, LayerNorm, GELU) become `GPT2LMHeadModel`,
    Llama-family ones (RoPE, RMSNorm, SwiGLU) `LlamaForCausalLM`; a model with no
    bias is written with zero biases where GPT-2 has them. `dtype` (default: the
    model's) sets the stored precision. With token ids, `generation_config.json`
    is written too. Each file is written to a temporary name and renamed, so an
    interrupted export never leaves a half-written file under a final name.
    Returns the folder.
    """
    config = model.config
    family = hf_family(config)
    dtype = resolve_dtype(dtype) if dtype is not None else model.tok_emb.weight.dtype
    if dtype not in DTYPE_NAMES:
        raise UserError(f"dtype {dtype} is not supported for export; use one of {', '.join(DTYPE_NAMES.values())}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        hf_tensors = _gpt2_hf_tensors(model) if family == "gpt2" else _llama_hf_tensors(model)
        hf_tensors = {key: t.detach().to("cpu", dtype).contiguous() for key, t in hf_tensors.items()}
    hf_config = _gpt2_hf_config(config) if family == "gpt2" else _llama_hf_config(config)
    hf_config.update(architectures=[HF_CLASS[family]], dtype=DTYPE_NAMES[dtype],
                     bos_token_id=bos_token_id, eos_token_id=eos_token_id, use_cache=True)  # fmt: skip

    _save_safetensors_atomically(out_dir / "model.safetensors", hf_tensors)
    write_json(out_dir / "config.json", hf_config, sort_keys=True)
    if bos_token_id is not None or eos_token_id is not None:
        generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
        write_json(out_dir / "generation_config.json", generation, sort_keys=True)
    return out_dir


def _gpt2_hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
    }


def _llama_hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
    }


def _llama_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under Llama names; a tied head is listed once (as the embedding)."""
    top = LLAMA_TOP_MODULES
    hf_tensors = {}
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module.startswith("blocks."):
            _, index, inner = module.split(".", 2)
            hf_tensors[f"model.layers.{index}.{LLAMA_LAYER_MODULES[inner]}.{leaf}"] = param
        else:
            hf_tensors[f"{top[module]}.{leaf}"] = param
    return hf_tensors


def _gpt2_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters as GPT-2 tensors: q, k, v fused into c_attn, Conv1D (in, out) layout."""
    hf_tensors = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight}
    _put_layernorm(hf_tensors, "transformer.ln_f", model.final_norm)
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        attn, mlp = block.attn, block.mlp
        _put_layernorm(hf_tensors, prefix + "ln_1", block.attn_norm)
        _put_conv1d(hf_tensors, prefix + "attn.c_attn", [attn.q_proj, attn.k_proj, attn.v_proj])
        _put_conv1d(hf_tensors, prefix + "attn.c_proj", [attn.out_proj])
        _put_layernorm(hf_tensors, prefix + "ln_2", block.mlp_norm)
        _put_conv1d(hf_tensors, prefix + "mlp.c_fc", [mlp.up_proj])
        _put_conv1d(hf_tensors, prefix + "mlp.c_proj", [mlp.down_proj])
    if not model.config.tie_embeddings:
        hf_tensors["lm_head.weight"] = model.lm_head.weight
    return hf_tensors


def _put_layernorm(hf_tensors: dict[str, torch.Tensor], name: str, norm: nn.LayerNorm) -> None:
    hf_tensors[f"{name}.weight"] = norm.weight
    hf_tensors[f"{name}.bias"] = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)


def _put_conv1d(hf_tensors: dict[str, torch.Tensor], name: str, linears: list[nn.Linear]) -> None:
    """Linear layers side by side as one Conv1D: weight (in, sum of outs); a missing bias is zeros."""
    hf_tensors[f"{name}.weight"] = torch.cat([linear.weight for linear in linears]).t()  # (in, out)
    hf_tensors[f"{name}.bias"] = torch.cat([
        linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        for linear in linears
    ])  # fmt: skip


def _save_safetensors_atomically(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors' save_file into a temporary file beside `path`, fsynced, then renamed to `path`
    (save_file wants a file name, so this uses `atomic_target` rather than `atomic_write`)."""
    safetensors = import_safetensors()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_target(path, size_hint=size) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
