"""Text generation: greedy decoding and sampling (temperature, top-k, top-p), with a KV cache.

`generate` returns whole sequences; `stream_tokens` yields the new tokens one
step at a time (what a terminal or chat loop wants). Prompts in a batch may have
different lengths: they are left-padded, and the padding is masked out of
attention and position ids, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .model import GPT


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,). temperature 0 = greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probabilities add up to top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the best one always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def mark_finished(next_token: torch.Tensor, finished: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """`next_token` (B,) with rows that already ended held at the first end-of-sequence id; `finished` (B,) is
    updated in place with the rows that end now. No end ids: tokens unchanged."""
    if len(eos_ids):
        next_token = torch.where(finished, eos_ids[0], next_token)
        finished |= torch.isin(next_token, eos_ids)
    return next_token


def next_token_logits_function(model: GPT, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (B, D) -> logits (B, V): the LM head, in the fastest form for decoding on this device.

    Each decoding step multiplies a few hidden vectors by the whole (V, D) head, so it is
    bound by how fast the weights stream from memory. With torch's CPU build the plain
    `hidden @ W.T` streams them at well under half the speed of other equivalent forms
    (measured in BENCHMARKS.md with `python -m benchmarks.decode_head`). For one row, our
    `Linear` already takes the fastest form (`gpt.linear.row_blocked_product`); for several,
    `(W @ hidden.T).T`. The results equal the plain product up to float rounding
    (summation order). On GPUs the plain product is already fast.
    """
    if not isinstance(model.lm_head, nn.Linear):  # a quantized head (gpt/quantize) picks its own path
        return model.lm_head
    weight = model.lm_head.weight  # (V, D)
    if weight.device.type != "cpu" or batch_size == 1:
        return model.lm_head
    return lambda hidden: (weight.to(hidden.dtype) @ hidden.T).T


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of any lengths -> ids (B, T) left-padded with 0, and a padding mask (None when no row is padded)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    return ids, (None if bool(mask.all()) else mask)


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) at each step, until max_new_tokens or every row has hit eos.

    A row that has finished keeps yielding its eos id, so the batch stays rectangular.
    """
    context_length = model.config.context_length
    longest = max((len(p) for p in prompts), default=0)
    if use_cache and longest + max_new_tokens > context_length:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context_length ({context_length}); shorten the prompt or generate fewer tokens"
        )
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long)
    device = model.tok_emb.weight.device
    eos_ids = eos_ids.to(device)
    ids, padding_mask = _left_pad(prompts, device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(len(prompts), longest + max_new_tokens) if use_cache else None
        next_token_logits = next_token_logits_function(model, len(prompts))
        step_input = ids
        for _ in range(max_new_tokens):
            if use_cache:
                hidden = model.hidden_states(step_input, cache=cache, padding_mask=padding_mask)[:, -1]  # (B, D)
                logits = next_token_logits(hidden)  # (B, V)
                padding_mask = None  # only the prompt is padded; new tokens are real in every row
            else:
                window = ids[:, -context_length:]
                mask = padding_mask[:, -context_length:] if padding_mask is not None else None
                logits = model(window, padding_mask=mask)[:, -1]  # (B, V)
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            next_token = mark_finished(next_token, finished, eos_ids)
            yield next_token
            if bool(finished.all()):
                return
            step_input = next_token[:, None]  # (B, 1)
            if not use_cache:
                ids = torch.cat([ids, step_input], dim=1)
                if padding_mask is not None:
                    padding_mask = torch.cat([padding_mask, torch.ones_like(step_input, dtype=torch.bool)], dim=1)
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return prompt + new tokens.

    `input_ids` is a tensor (T,) or (B, T), or a list of token-id lists of any lengths.
    A tensor comes back as a tensor (rows that stopped early are filled with eos_id);
    a list comes back as a list, each row ending at its first eos (included).
    """
    as_tensor = isinstance(input_ids, torch.Tensor)
    if as_tensor:
        squeeze = input_ids.dim() == 1
        prompts = (input_ids[None] if squeeze else input_ids).tolist()
    else:
        prompts = [list(p) for p in input_ids]
    steps = list(stream_tokens(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator))
    new_tokens = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(len(prompts), 0, dtype=torch.long)
    if as_tensor:
        out = torch.cat([torch.as_tensor(prompts, dtype=torch.long), new_tokens], dim=1).to(input_ids.device)
        return out[0] if squeeze else out
    eos_set = {eos_id} if isinstance(eos_id, int) else set(eos_id or [])
    result = []
    for prompt, row in zip(prompts, new_tokens.tolist()):
        stop = next((i + 1 for i, token in enumerate(row) if token in eos_set), len(row))
        result.append(prompt + row[:stop])
    return result
