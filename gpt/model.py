"""The transformer, written by hand and meant to be read top to bottom.

One `ModelConfig` covers both families:

    GPT-2:  learned positions, LayerNorm, GELU MLP, biases, multi-head attention
    Llama:  RoPE,              RMSNorm,   SwiGLU MLP, no biases, grouped-query attention

Data flow for a batch of token ids (B = batch, T = sequence length, D = d_model):

    input_ids (B, T)
      -> tok_emb (+ pos_emb when learned)             (B, T, D)
      -> n_layer x Block: x + attn(norm(x)); x + mlp(norm(x))
      -> final_norm                                   (B, T, D)
      -> lm_head                                      (B, T, vocab_size) logits

A `KVCache` keeps the keys and values of earlier positions so that generation
feeds one new token per step instead of the whole sequence again.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# ----------------------------------------------------------------------------
# Linear layers
# ----------------------------------------------------------------------------


def row_blocked_product(hidden: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """hidden (B, D) @ weight (N, D).T -> (B, N), as one batched matmul over `blocks` row blocks of the weight.

    torch's CPU build runs a matrix-vector product (one row of `hidden`) on one core, which
    streams the weight at a fraction of the memory bandwidth; the products of one `bmm`
    run on its threads at once. The blocks are views, no copy: block i holds rows
    [i * s, i * s + Nb) with s = N // blocks, and the last block is as long as it must be to
    reach row N, so where N does not divide evenly it overlaps its neighbour by a few rows
    (an as_strided view needs one stride between blocks). Equal to the plain product up to
    float rounding.
    """
    rows_out, width = weight.shape
    blocks = max(1, min(blocks, rows_out))
    step = rows_out // blocks
    block_rows = rows_out - (blocks - 1) * step
    weight = weight.to(hidden.dtype).contiguous()  # no copy when it already is
    stacked = weight.as_strided((blocks, block_rows, width), (step * width, width, 1))  # (k, Nb, D)
    rows = hidden.shape[0]
    parts = torch.bmm(stacked, hidden.T.unsqueeze(0).expand(blocks, width, rows))  # (k, Nb, B)
    # Rows [0, (k-1) * s) come from the first k-1 blocks, the rest from the last: (N, B) -> (B, N).
    return torch.cat([parts[:-1, :step].reshape(-1, rows), parts[-1]]).T


class Linear(nn.Linear):
    """`nn.Linear`, except that a single row on CPU without autograd (a decoding step) uses every thread.

    Batch-1 decoding multiplies one vector by each weight: `row_blocked_product` spreads
    that over torch's threads (GPT-2 124M batch-1 generation 27.7 -> 51.9 tokens/s on a
    2-core CPU, BENCHMARKS.md). Everything else (training, prefill, batches, autocast) is
    plain `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.numel() == x.shape[-1]
        if one_row and x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            out = row_blocked_product(x.reshape(1, -1), self.weight, torch.get_num_threads())  # (1, N)
            out = out.view(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        return super().forward(x)


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
# Key/value cache for incremental decoding
# ----------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, filled as generation advances.

    Slots are shared by the whole batch: after a prefill of T tokens, slots
    [0, T) hold the prompt and each decoding step writes one more slot. A row
    whose prompt was left-padded marks its padding slots invalid in `key_valid`,
    and `next_position` keeps each row's own position count (padding excluded).
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.n_layer, batch_size, config.n_kv_head, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch_size, max_length, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0  # slots filled so far
        self.padded = False  # True once some row holds padding slots: attention then needs key_valid
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, n_kv_head, T, hd); return all keys and values so far (B, n_kv_head, S, hd)."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ----------------------------------------------------------------------------
# Attention, MLP, block
# ----------------------------------------------------------------------------


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
        if self.n_kv_head != self.n_head:  # grouped-query: repeat each key/value head for its query heads
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)  # (B, n_head, S, hd)
            v = v.repeat_interleave(group, dim=1)

        if self.attn_impl == "manual":
            out = self._manual_attention(q, k, v, allowed)
        else:
            dropout_p = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout_p, is_causal=allowed is None and T > 1
            )
        out = out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, D)
        return self.resid_dropout(self.out_proj(out))

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

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        allowed: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
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

        `padding_mask` (B, T), True at real tokens, marks left padding: padded
        positions are neither attended to nor counted in position ids.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.config.context_length}")
        if cache is not None and start + T > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} positions; {start + T} needed")

        # Position ids: 0, 1, 2, ... per row, continuing from the cache and skipping left padding.
        if padding_mask is None and (cache is None or not cache.padded):
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,) shared by all rows
        else:
            steps = padding_mask.long().cumsum(dim=1) - 1 if padding_mask is not None else torch.arange(
                T, device=input_ids.device
            ).expand(B, T)
            offset = cache.next_position[:, None] if cache is not None else 0
            positions = (offset + steps).clamp(min=0)  # (B, T)

        allowed = self._allowed_keys(T, start, cache, padding_mask)

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
        if cache is not None:
            cache.length += T
            cache.next_position += padding_mask.sum(dim=1) if padding_mask is not None else T
        return self.final_norm(x)

    @staticmethod
    def _allowed_keys(
        T: int, start: int, cache: KVCache | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Which keys each query may attend to, (B, 1, T, S) bool; None for the plain causal case.

        The plain case covers decoding without padding, the hot loop of generation: one new
        query sees every cached key, or a prefill from an empty cache is ordinary causal.
        """
        if cache is not None and padding_mask is not None:
            cache.key_valid[:, start:start + T] = padding_mask
            cache.padded = True
        if padding_mask is None and (cache is None or (not cache.padded and (T == 1 or start == 0))):
            return None
        if cache is not None:
            key_valid = cache.key_valid[:, :start + T]  # (B, S)
        else:
            key_valid = padding_mask
        S = start + T
        device = key_valid.device
        key_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        query_slot = start + torch.arange(T, device=device)[:, None]  # (T, 1)
        causal = key_slot <= query_slot  # (T, S)
        # A padding query sees only itself, so no softmax row is empty.
        allowed = (causal[None] & key_valid[:, None, :]) | (key_slot == query_slot)[None]  # (B, T, S)
        return allowed[:, None]  # (B, 1, T, S)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size).

        With `targets` (B, T) it returns the mean cross-entropy instead (targets of -100
        are ignored), computed by `linear_cross_entropy` without materializing the logits.
        """
        hidden = self.hidden_states(input_ids, cache, padding_mask)  # (B, T, D)
        if targets is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype."""
        weight = self.tok_emb.weight
        length = max_length or self.config.context_length
        return KVCache(self.config, batch_size, length, device=weight.device, dtype=weight.dtype)

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


# ----------------------------------------------------------------------------
# The training loss, fused with the LM head
# ----------------------------------------------------------------------------


_CPU_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized buffer for the fused loss, reused across calls on CPU.

    A fresh 100+ MB tensor each step costs glibc a new mapping and the kernel a page fault
    per 4 KiB page when it is first written (about 50 ms a step for tiny's 206 MB of
    logits). On CPU each named buffer is kept (the largest asked for so far, bounded by the
    loss's 256 MB chunks) for the life of the process; CUDA's caching allocator already
    reuses its blocks. So the loss is not re-entrant on CPU: two threads must not run it at once.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    kept = _CPU_WORKSPACE.get((name, dtype))
    if kept is None or kept.numel() < numel:
        kept = _CPU_WORKSPACE[name, dtype] = torch.empty(numel, dtype=dtype)
    return kept[:numel].view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, a chunk of rows at a time.

    The plain way, `F.cross_entropy(lm_head(hidden), targets)`, builds the whole logits
    tensor (B*T x vocab: 412 MB for 8 x 256 x 50k in float32), keeps it for backward and
    makes a float32 copy under autocast. Here each chunk's logits live only briefly: the
    forward pass computes the loss and, while the softmax is at hand, the gradients
    with respect to `hidden` and `weight` (d loss / d logits = softmax - one_hot);
    backward only scales them. Same FLOPs, a fraction of the memory traffic.

    Two sizes matter. A chunk (up to 256 MB of logits; one chunk for a 2048-row bf16
    batch of GPT-2's vocabulary) is large so that the weight-gradient matmul, which adds
    into the whole (V, D) gradient once per chunk, runs few times. The softmax then walks
    the chunk in blocks of a few rows that fit in the CPU cache: a float32 copy of the
    block, torch's fused softmax kernel, the one-hot subtracted, and the result written
    back over the block's logits, so main memory is read about once.

    The weight arrives in its master dtype (float32 under autocast) and is cast here for
    the matmuls, so its gradient is summed and returned in float32, never rounded to bf16.
    The big buffers come from `workspace` (reused between steps on CPU).
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, block_rows: int
    ):
        # hidden (N, D) in the matmul dtype, weight (V, D) in its own (master) dtype, targets (N,) with -100 = ignore
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_hidden_grad or want_weight_grad
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        matmul_weight = weight  # (V, D)
        if weight.dtype != hidden.dtype:
            matmul_weight = workspace("weight", weight.shape, hidden.dtype, weight.device).copy_(weight)
        n_counted = (targets != -100).sum()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = None  # (V, D) in the weight's dtype, summed over chunks
        logits_buffer = workspace("logits", (min(chunk_rows, n_rows), vocab), hidden.dtype, hidden.device)
        block_row_index = torch.arange(block_rows, device=hidden.device)  # 0..b-1, for the one-hot
        # float32 room for one block of logits (when they are bf16/fp16) and one of probabilities
        float_block = None
        if hidden.dtype != torch.float32:
            float_block = workspace("float block", (block_rows, vocab), torch.float32, hidden.device)
        probs_block = workspace("probabilities", (block_rows, vocab), torch.float32, hidden.device)
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start:start + chunk_rows]  # (c, D)
            t = targets[start:start + chunk_rows]  # (c,)
            counted = (t != -100).float()  # (c,) 1 where the target counts
            safe_t = t.clamp(min=0)
            logits = torch.mm(h, matmul_weight.T, out=logits_buffer[:len(t)])  # (c, V)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1).float()  # (c,)
            log_norm = torch.empty(len(t), dtype=torch.float32, device=h.device)  # (c,) log sum exp per row
            for row in range(0, len(t), block_rows):
                block = logits[row:row + block_rows]  # (b, V)
                block32 = block if float_block is None else float_block[:len(block)].copy_(block)  # (b, V) float32
                probs = probs_block[:len(block)]
                # One fused kernel (row max, exp and sum, scale) in place of five passes over the block.
                torch.ops.aten._softmax.out(block32, -1, False, out=probs)  # (b, V)
                # The top probability is exp(0) / sum, so log sum exp = row max - log(top
                # probability); it is at least 1/V, so the log never sees an underflow.
                log_norm[row:row + block_rows] = block32.amax(dim=-1) - probs.amax(dim=-1).log()
                if want_grad:
                    # softmax minus one-hot, zero on ignored rows: the gradient of each counted row's loss
                    probs.mul_(counted[row:row + block_rows, None])
                    probs[block_row_index[:len(probs)], safe_t[row:row + block_rows]] -= counted[row:row + block_rows]
                    block.copy_(probs)  # back into the chunk, for the matmuls below
            total += ((log_norm - target_logit) * counted).sum()
            if want_grad:
                grad_logits = logits  # (c, V), now holding the gradient
                if want_hidden_grad:
                    torch.mm(grad_logits, matmul_weight, out=grad_hidden[start:start + chunk_rows])  # (c, D)
                if want_weight_grad:
                    if h.dtype == weight.dtype:
                        if grad_weight is None:
                            grad_weight = grad_logits.T @ h  # (V, D)
                        else:
                            grad_weight.addmm_(grad_logits.T, h)  # accumulate inside the matmul, no temporary
                    else:  # a bf16/fp16 matmul cannot write a float32 sum: a product, then one cast or add
                        product = torch.mm(grad_logits.T, h, out=workspace("weight grad", weight.shape, h.dtype, h.device))
                        if grad_weight is None:
                            grad_weight = product.to(weight.dtype)
                        else:  # the default chunk size makes this rare
                            grad_weight += product
        n = n_counted.clamp(min=1).to(torch.float32)
        # Kept on ctx, not saved for backward: backward scales them in place (no new
        # (V, D) tensor), which is only right once.
        ctx.grads = (grad_hidden, grad_weight, n)
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward can run only once per forward")
        grad_hidden, grad_weight, n = ctx.grads
        ctx.grads = None
        scale = grad_output / n
        if grad_hidden is not None:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(scale.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


# Eager inside a compiled model (a graph break at the loss; the body still compiles whole):
# traced, its unrolled block loop made the tiny bf16 CPU step 870 ms against 460 ms eager.
@torch.compiler.disable
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    chunk_rows: int | None = None, block_rows: int | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)` without the full logits tensor.

    hidden (N, D), weight (V, D), targets (N,). Under autocast the matmuls run in the
    autocast precision and the softmax in float32, as they would in the plain version.
    `chunk_rows` and `block_rows` (rows per matmul chunk and per softmax block) default to
    equal chunks of at most 256 MB of logits and blocks of about 8 MB of float32 logits.
    The weight is cast for the matmuls inside, so its gradient comes back in its own
    dtype without a round trip through bf16.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        # As few chunks as fit: each chunk adds one (V, D) matmul result into the weight gradient.
        max_rows = max(16, (256 << 20) // (hidden.element_size() * vocab))
        n_chunks = max(1, math.ceil(n_rows / max_rows))
        chunk_rows = math.ceil(n_rows / n_chunks)
    block_rows = block_rows or max(1, (8 << 20) // (4 * vocab))
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, block_rows)
