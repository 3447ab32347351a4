"""The transformer, written by hand and meant to be read top to bottom.

One `ModelConfig` covers both families:

    GPT-2:  learned positions, LayerNorm, GELU MLP, biases, multi-head attention
    Llama:  RoPE,              RMSNorm,   SwiGLU MLP, no biases, grouped-query attention

Data flow for a batch of token ids (B = batch, T = sequence length, D = d_model):

    input_ids (B, T)
      -> position ids and attention mask              (gpt/cache.py: padding, KV cache)
      -> tok_emb (+ pos_emb when learned)             (B, T, D)
      -> n_layer x Block: x + attn(norm(x)); x + mlp(norm(x))
      -> final_norm                                   (B, T, D)
      -> lm_head                                      (B, T, vocab_size) logits
      -> with targets: the mean cross-entropy loss    ()

The order of this file follows that flow: norms, RoPE, attention, MLP, block, GPT.
Two fast paths sit beside their readable references, each chosen by a config switch and
tested equal to it: `attn_impl` ("manual" attention in plain tensor code, or torch's
fused `scaled_dot_product_attention`) and `loss_impl` ("plain" cross-entropy of the
logits, or the "fused" head + loss of gpt/fused_loss.py that never builds the logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .cache import KVCache, positions_and_mask
from .config import ModelConfig
from .fused_loss import LossWorkspace, linear_cross_entropy
from .linear import Linear  # nn.Linear, plus a multi-threaded one-row product for CPU decoding

# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no centering, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()  # the mean of squares in float32, whatever the input precision
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ----------------------------------------------------------------------------


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_positions, head_dim), in the rotate-halves layout.

    Pair i of a head vector is (x[i], x[i + head_dim/2]); it turns by the angle
    position * theta^(-2i / head_dim), so the query-key product depends only on
    the distance between the two positions.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (hd/2,)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, hd): both halves of a pair share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + hd/2]) pair of `x` (B, H, T, hd) by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_by_90 = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_by_90 * sin.to(x.dtype)


# ----------------------------------------------------------------------------
# Attention, MLP, block
# ----------------------------------------------------------------------------


def sdpa_takes_grouped_heads(q: torch.Tensor, allowed: torch.Tensor | None) -> bool:
    """Whether SDPA's kernel for q (B, n_head, T, hd) and this mask reads grouped key/value heads itself
    (enable_gqa), without copies. CPU's kernels do. On CUDA flash attention does (compute capability 8.0 and up,
    half precision, no mask); the memory-efficient kernel, which takes masks and float32, wants as many
    key/value heads as query heads (torch 2.13's SDPA documentation), and grouped heads would send the call to
    SDPA's math kernel instead, slower than repeating the heads."""
    if q.device.type == "cpu":
        return True
    return (q.device.type == "cuda" and allowed is None and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_properties(q.device).major >= 8)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees only itself and earlier positions.

    With n_kv_head < n_head (grouped-query attention), each key/value head serves
    n_head / n_kv_head query heads.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.q_proj = Linear(config.d_model, config.n_head * config.head_dim, bias=config.bias)
        self.k_proj = Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v_proj = Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.bias)
        self.out_proj = Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        allowed: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `allowed` (B, 1, T, S) says which keys each query may see.

        None means the plain causal rule: query i sees keys 0..i, counted from the end
        when a cache holds earlier keys (a single new query sees every cached key).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, n_kv_head, S, hd), S = cached + T
        if cache is not None and cache.row_lengths is not None:
            # Rows holding different numbers of keys (the serving engine's slot cache): each row attends
            # to its own keys alone, the same computation as decoding it by itself (gpt/serve/slot_cache.py).
            rows = [self._attend(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], None)
                    for i, n in enumerate(cache.row_lengths)]
            out = torch.cat(rows)  # (B, n_head, T, hd)
        else:
            out = self._attend(q, k, v, allowed)
        out = out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, D)
        return self.resid_dropout(self.out_proj(out))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """q (B, n_head, T, hd) attends to k, v (B, n_kv_head, S, hd) -> (B, n_head, T, hd)."""
        grouped = self.n_kv_head != self.n_head  # grouped-query: each key/value head serves n_head / n_kv_head
        if grouped and (self.attn_impl == "manual" or not sdpa_takes_grouped_heads(q, allowed)):
            group = self.n_head // self.n_kv_head  # repeat each key/value head for its query heads
            k = k.repeat_interleave(group, dim=1)  # (B, n_head, S, hd)
            v = v.repeat_interleave(group, dim=1)
        if self.attn_impl == "manual":
            return self._manual_attention(q, k, v, allowed)
        dropout_p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p, is_causal=allowed is None and q.shape[2] > 1,
            enable_gqa=k.shape[1] != self.n_head,  # SDPA pairs query head h with key/value head h // group
        )

    def _manual_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + causal mask) v, in plain tensor code. q (B, H, T, hd), k, v (B, H, S, hd)."""
        T, S = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if allowed is None:  # query i sees keys 0..i
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # each row sums to 1 over visible keys
        weights = self.attn_dropout(weights)
        return weights @ v  # (B, H, T, hd)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2) or SwiGLU (Llama)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, d_ff)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, d_ff)
        return self.dropout(self.down_proj(hidden))  # (B, T, D)


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        # Set by training (train.activation_checkpointing): keep only the block's input for the backward pass
        # and recompute the rest there.
        self.activation_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        allowed: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # The same computation; its activations are dropped now and recomputed in the backward pass
            # (with the same dropout masks: the random state is replayed).
            return torch.utils.checkpoint.checkpoint(self.residual_branches, x, rope, allowed, cache,
                                                     use_reentrant=False)
        return self.residual_branches(x, rope, allowed, cache)

    def residual_branches(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        allowed: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """x + attention(norm(x)), then + mlp(norm(x)): (B, T, D) -> (B, T, D)."""
        x = x + self.attn(self.attn_norm(x), rope, allowed, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


class GPT(nn.Module):
    """A decoder-only transformer language model: `model(input_ids)` -> logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.pos_emb == "learned" else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.loss_workspace = LossWorkspace()  # buffers the fused loss keeps between steps
        self.reset_rope_tables()
        self.apply(self._init_weights)
        # GPT-2 scaling: each block adds two residual branches, so their output projections
        # start smaller (std / sqrt(2 * n_layer)) to keep the residual stream's variance in check.
        for name, param in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def reset_rope_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE cos/sin tables; they are derived from the config, never saved."""
        if self.config.pos_emb != "rope":
            self.register_buffer("rope_cos", None, persistent=False)
            self.register_buffer("rope_sin", None, persistent=False)
            return
        cos, sin = rope_tables(self.config.head_dim, self.config.context_length, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (context_length, hd)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, D) before the LM head.

        `padding_mask` (B, T), True at real tokens, marks left padding: padded positions
        are neither attended to nor counted in position ids. With a `cache`, the tokens
        continue the sequence the cache holds.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.config.context_length}")
        if cache is not None:
            positions, allowed = cache.begin(T, padding_mask)  # (T,) or (B, T); (B, 1, T, S) or None
        else:
            positions, allowed = positions_and_mask(T, padding_mask, input_ids.device)

        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.emb_dropout(x)
        rope = None
        if self.rope_cos is not None:
            # (T, hd) -> (1, 1, T, hd), or (B, T, hd) -> (B, 1, T, hd): broadcast over heads
            rope = (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
        for block in self.blocks:
            x = block(x, rope, allowed, cache)
        return self.final_norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size).

        With `targets` (B, T) it returns the mean cross-entropy instead; targets of -100
        are ignored (padding, a masked prompt).
        """
        hidden = self.hidden_states(input_ids, cache, padding_mask)  # (B, T, D)
        if targets is None:
            return self.lm_head(hidden)  # (B, T, V)
        if self.config.loss_impl == "plain":
            logits = self.lm_head(hidden)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        # The same loss and gradients, a chunk of rows at a time, never holding all the logits.
        # A quantized head (gpt/quantize) has no float weight: the loss reads its dequantized copy.
        weight = self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head.dequantize()
        return linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.loss_workspace)

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache on the model's device, in the dtype its keys and values come in: autocast's when
        autocast is on for that device (half-precision keys are then neither widened into an fp32 cache nor
        cast back at every step), else the weights'."""
        weight = self.tok_emb.weight
        length = max_length or self.config.context_length
        device_type = weight.device.type
        autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype
        return KVCache(self.config, batch_size, length, device=weight.device, dtype=dtype)

    # ------------------------------------------------------------------ helpers

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Distinct parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token.

        6 FLOPs per weight that takes part in a matmul (2 forward, 4 backward), the LM head
        included even when tied, plus the attention matmuls: scores and weighted sum,
        2 * 2 * seq_len * d_model per layer forward, times 3 for forward + backward.
        """
        cfg = self.config
        seq_len = seq_len or cfg.context_length
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 12 * cfg.n_layer * seq_len * cfg.d_model
        return 6 * matmul_weights + attention
