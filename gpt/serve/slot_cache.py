"""The serving engine's KV cache: one row per slot, each row its own sequence.

`gpt.cache.KVCache` holds a batch that advances in lockstep: every row takes the same slot
at each step. A serving engine's requests start and end at different times, so here row i
belongs to whichever request occupies slot i, and holds that request's keys and values at
positions 0..lengths[i]-1, whatever the other rows hold:

    keys, values    (n_layer, slots, n_kv_head, max_length, hd), preallocated once
    lengths[i]      keys row i holds; 0 = a free slot

A request enters with `store_prompt`: its prompt was prefilled alone through an ordinary
`KVCache`, exactly as `gpt.generate` does, and those keys and values are copied into its row.
Each decoding step then feeds one token per row through `GPT.hidden_states(tokens, cache=...)`
with the same `begin` / `update` calls a `KVCache` answers:

- `begin(1)` puts row i's new token at position lengths[i] (a free row writes a dummy token
  at position 0, which its next occupant overwrites) and sets `row_lengths`, the keys each
  row attends over, so attention (`CausalSelfAttention` in gpt/model.py) runs row by row over
  each row's own keys: the same call as decoding that row alone, never a mask over the
  longest row's length.
- `update` stores the step's keys and values with one indexed write per layer and returns
  the whole buffers, from which attention slices each row's prefix (views, no copies).

No step does work proportional to the cache's size, and nothing is allocated per step
besides the (slots,) position tensor.
"""

from __future__ import annotations

import torch

from ..cache import KVCache, kv_buffers
from ..config import ModelConfig


class SlotCache:
    """Keys and values of `slots` independent sequences of up to `max_length` tokens each."""

    def __init__(
        self, config: ModelConfig, slots: int, max_length: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        self.keys, self.values = kv_buffers(config, slots, max_length, device, dtype)
        self.max_length = max_length
        self.lengths = [0] * slots  # keys held per row; 0 = a free slot
        self.row_lengths: list[int] | None = None  # keys each row attends over in the current step
        self._rows = torch.arange(slots, device=device)  # (slots,)
        self._write_at = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,) this step's positions

    @property
    def length(self) -> int:
        """The longest row: what `GPT.hidden_states` checks against the context length."""
        return max(self.lengths)

    def store_prompt(self, slot: int, prefill: KVCache) -> None:
        """Take over the keys and values of a one-row `prefill` cache as row `slot`."""
        n = prefill.length
        self.keys[:, slot, :, :n] = prefill.keys[:, 0, :, :n]
        self.values[:, slot, :, :n] = prefill.values[:, 0, :, :n]
        self.lengths[slot] = n

    def release(self, slot: int) -> None:
        """Free row `slot`; its stale keys are never read again (attention reads only a row's own prefix)."""
        self.lengths[slot] = 0

    def begin(self, T: int, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Take one position in every row for this step's token; return position ids (slots, 1) and no mask."""
        if T != 1 or padding_mask is not None:
            raise ValueError("a SlotCache step decodes exactly one token per row, unpadded")
        write_at = list(self.lengths)  # a free row (length 0) writes its dummy token at position 0
        if max(write_at) >= self.max_length:
            raise ValueError(f"slot cache holds {self.max_length} positions per row; {max(write_at) + 1} needed")
        self.row_lengths = [n + 1 for n in write_at]
        self.lengths = [n + 1 if n else 0 for n in self.lengths]
        self._write_at = torch.tensor(write_at, device=self._rows.device)  # (slots,)
        return self._write_at[:, None], None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (slots, n_kv_head, 1, hd); return the layer's buffers (slots, n_kv_head, max_length, hd).

        Row i's keys are [:lengths[i]]; attention slices them (`row_lengths`).
        """
        keys, values = self.keys[layer], self.values[layer]
        keys[self._rows, :, self._write_at] = k[:, :, 0].to(keys.dtype)  # (slots, n_kv_head, hd), one per row
        values[self._rows, :, self._write_at] = v[:, :, 0].to(values.dtype)
        return keys, values
