"""Evaluation: next-token loss and perplexity (classification and instruction metrics join later).

Perplexity is exp(mean next-token cross-entropy), the mean taken over every
predicted token, so batches of different sizes weigh by their tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of predicting `targets` (B, T) from `inputs` (B, T); target -100 is ignored."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def language_model_metrics(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `batches` of (inputs, targets)."""
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)  # (B, T, V)
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        total_loss += loss_sum.item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate")
    loss = total_loss / total_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}
