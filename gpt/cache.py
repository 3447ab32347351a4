"""Positions and attention masks for a forward pass, and the key/value cache of generation.

A forward pass needs two things besides the token ids: each token's position id (for
learned or rotary position embeddings) and which keys each query may attend to. In the
plain case, a batch of sequences starting at position 0, these are `0..T-1` and the
causal rule ("query i sees keys 0..i"), which attention applies without a mask.

Two things change that, and both are handled here:

- **Left padding.** A batch of prompts of different lengths is left-padded; a
  `padding_mask` (B, T), True at real tokens, says where. Padding gets no position
  (each row counts its own real tokens from 0) and no query may attend to it.
- **The KV cache.** Generation feeds one new token per step; `KVCache` keeps the keys and
  values of earlier positions, one slot per position, shared by the whole batch. It
  remembers which slots of each row were padding (`key_valid`) and each row's next
  position id, so a step continues exactly where the row left off.

`positions_and_mask` serves a pass without a cache; `KVCache.begin` serves a cached one
(it also reserves the step's slots, which each attention layer then fills with `update`).
Either returns (positions, allowed): positions (T,) shared by all rows or (B, T) per row,
and allowed (B, 1, T, S) bool, or None for the plain causal rule.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def attention_mask(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Which keys each of T queries may see, (B, 1, T, S): causal, and never a padding key.

    `key_valid` (B, S) is True at real tokens; the queries sit at slots start..start+T-1.
    A padding query sees only itself, so no softmax row is empty.
    """
    S = key_valid.shape[1]
    key_slot = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    query_slot = start + torch.arange(T, device=key_valid.device)[:, None]  # (T, 1)
    causal = key_slot <= query_slot  # (T, S)
    allowed = (causal[None] & key_valid[:, None, :]) | (key_slot == query_slot)[None]  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def padded_positions(padding_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that skip left padding: each row counts its real tokens from 0 (padding gets 0)."""
    return (padding_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def positions_and_mask(
    T: int, padding_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids and the attention mask of a pass without a cache (see the module docstring)."""
    if padding_mask is None:
        return torch.arange(T, device=device), None  # (T,), plain causal
    return padded_positions(padding_mask), attention_mask(padding_mask, 0, T)


def kv_buffers(
    config: ModelConfig, rows: int, max_length: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values for `rows` sequences of up to `max_length` positions, every layer at once:
    two tensors (n_layer, rows, n_kv_head, max_length, head_dim)."""
    shape = (config.n_layer, rows, config.n_kv_head, max_length, config.head_dim)
    return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    """Preallocated keys and values of every layer, filled as generation advances.

    After a prefill of T tokens, slots [0, T) hold the prompt and each decoding step
    takes one more slot. `length` counts the slots taken so far.
    """

    # Every row attends over the same `length` slots (padding masked). A cache whose rows hold
    # different numbers of keys (gpt/serve/slot_cache.py) lists them here, and attention runs row by row.
    row_lengths: list[int] | None = None

    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        self.keys, self.values = kv_buffers(config, batch_size, max_length, device, dtype)
        self.key_valid = torch.ones(batch_size, max_length, device=device, dtype=torch.bool)  # False at padding
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)  # per row, padding excluded
        self.max_length = max_length
        self.length = 0  # slots taken so far
        self.step_start = 0  # the first slot of the current step
        self.padded = False  # True once some row holds padding slots: attention then needs key_valid

    def begin(
        self, T: int, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Take the slots of T new tokens; return their position ids and attention mask (module docstring).

        `padding_mask` (B, T) marks left padding among the new tokens (a prompt's prefill).
        """
        start, end = self.length, self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} needed")
        device = self.key_valid.device
        if padding_mask is not None:
            self.key_valid[:, start:end] = padding_mask
            self.padded = True
        if not self.padded:
            positions = torch.arange(start, end, device=device)  # (T,) shared by all rows
        else:
            steps = padding_mask.long().cumsum(dim=1) - 1 if padding_mask is not None else torch.arange(T, device=device)
            positions = (self.next_position[:, None] + steps).clamp(min=0)  # (B, T)
        # One new query sees every cached key, and a prefill from an empty cache is plain causal.
        plain = not self.padded and (T == 1 or start == 0)
        allowed = None if plain else attention_mask(self.key_valid[:, :end], start, T)
        self.next_position += padding_mask.sum(dim=1) if padding_mask is not None else T
        self.step_start, self.length = start, end
        return positions, allowed

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache holding copies of the given rows (a row may repeat): several continuations of
        one cached context, each continuing its own copy."""
        chosen = KVCache.__new__(KVCache)
        chosen.keys, chosen.values = self.keys[:, rows], self.values[:, rows]
        chosen.key_valid, chosen.next_position = self.key_valid[rows], self.next_position[rows]
        chosen.max_length, chosen.length, chosen.step_start, chosen.padded = (
            self.max_length, self.length, self.step_start, self.padded)
        return chosen

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, n_kv_head, T, hd); return all keys and values so far (B, n_kv_head, S, hd)."""
        start, end = self.step_start, self.length
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
