"""Batch invariance: why a request's tokens do not depend on what else the engine serves.

Float arithmetic is not associative, so a reduction's result depends on the order of its
terms, and kernels pick that order by shape: a matmul by M, N and K (MKL computes a row of
an 8-row product in another order than the same row alone, or than the fifth row of a
5-row product), a softmax by its length. A continuous-batching engine changes both shapes
every step (how many requests run, how long the longest is), so without care a request's
logits, and in time its tokens, would depend on its neighbours. Three choices remove every
path by which one row could touch another:

1. **A fixed step shape.** Every decoding step runs all `width` rows, free slots fed a
   dummy token, so the matmuls see one shape for the engine's whole life and a row's result
   depends only on its own inputs and its row index. The index is settled by
   `invariant_step_width`: it widens the step until every row computes alike (on MKL,
   widths 5 to 7 become 8: rows past a full tile of 4 take other kernels).
2. **Attention row by row** over exactly the row's own keys (`SlotCache.row_lengths`),
   never the batch's longest row with a mask: a softmax over 200 keys of which 100 are
   masked does not round like one over the 100 real keys.
3. **Prefill and sampling per request.** Each prompt is prefilled alone, exactly as
   `gpt.generate` does for one prompt, and each row is sampled on its own (1, V) logits
   with its own generator.

So a request's logits are bitwise the same alone or among `width - 1` others. With
`max_batch=1` they are bitwise those of `gpt.generate` on that prompt alone (the same
shapes, so the same kernels). With more rows, a decoding step's matmuls are `width`-row
products where `generate` runs 1-row ones: its logits differ from `generate`'s by float
rounding (about 1e-6 relative), so greedy and seeded tokens match `generate`'s except at
a near tie. Bitwise equality with `generate` would need MKL's 1-row kernel for every row,
and that kernel gains nothing from batching: 8 rows through it cost several times one
8-row product, and batching would be gone.

The costs: attention row by row takes longer than one masked call per layer, and a
request alone in a wide engine decodes at the speed of the full step, slower than with
`max_batch=1`. BENCHMARKS.md ("Serving") has the measurements; `python -m
benchmarks.serve_engine` compares the engine with `gpt.generate` end to end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from ..generate import next_token_logits_function
from ..model import GPT
from .slot_cache import SlotCache

log = logging.getLogger(__name__)


@torch.no_grad()
def rows_agree(
    model: GPT, width: int, autocast: Callable[[], contextlib.AbstractContextManager], cache_dtype: torch.dtype
) -> bool:
    """Do all `width` rows of a decoding step give bitwise the same logits for the same token and cache?"""
    device = model.tok_emb.weight.device
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    prefill = model.new_cache(1, 1)
    cache = SlotCache(model.config, width, 2, device=device, dtype=cache_dtype)
    with autocast():
        model.hidden_states(token, cache=prefill)
        for slot in range(width):
            cache.store_prompt(slot, prefill)
        hidden = model.hidden_states(token.expand(width, 1), cache=cache)[:, -1]  # (width, D)
        logits = next_token_logits_function(model, width)(hidden)  # (width, V)
    return bool((logits == logits[:1]).all())


def invariant_step_width(
    model: GPT, max_batch: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    cache_dtype: torch.dtype = torch.float32,
) -> int:
    """The narrowest step width >= max_batch at which every row of a step computes alike.

    Tries max_batch, then its next multiples of 4, 8 and 16. Kernels are chosen by shape,
    not by values, so one step of identical rows through the real model settles it for
    every later step of that width. `autocast` makes the context the engine's forwards run in,
    `cache_dtype` is its SlotCache's.
    """
    candidates = sorted({max_batch} | {-(-max_batch // m) * m for m in (4, 8, 16)})
    for width in candidates:
        if rows_agree(model, width, autocast, cache_dtype):
            return width
    log.warning("no step width in %s computes every row alike: a request's logits may depend on its slot "
                "(by float rounding)", candidates)
    return max_batch
