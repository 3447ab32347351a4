"""Language-model evaluation: next-token loss, perplexity and bits per byte.

Perplexity is exp(mean next-token cross-entropy), the mean taken over every predicted
token, so batches of different sizes weigh by their tokens. Every function here goes
through the model's own training loss (`model(inputs, targets=...)`), so evaluation
never builds the (B, T, vocab) logits tensor that the fused loss avoids.

Perplexity depends on the tokenizer: a vocabulary of longer tokens predicts fewer, harder
ones. Bits per byte does not: it is the total loss of the predicted tokens, in bits,
divided by the UTF-8 bytes those tokens stand for, so models with different tokenizers
(GPT-2's, SmolLM2's, a trained one) compare on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..model import GPT
from ..tokenizer import Tokenizer


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of predicting `targets` (B, T) from `inputs` (B, T); target -100 is ignored."""
    inputs, targets = batch
    return model(inputs, targets=targets)  # the model's fused head + loss: no full logits tensor


@torch.no_grad()
def language_model_metrics(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `batches` of (inputs, targets).

    Each batch goes through the model's own training loss (`model(inputs, targets=...)`),
    so evaluation never builds the (B, T, vocab) logits that the fused loss avoids.
    """
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        counted = int((targets != -100).sum())
        total_loss += model(inputs, targets=targets).item() * counted  # mean over counted targets -> their sum
        total_tokens += counted
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate")
    loss = total_loss / total_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": total_tokens}


def sliding_window_batches(ids: list[int], window: int, stride: int,
                           batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The windows over a long token list, `batch_size` at a time: (inputs, targets), each (B, window) on the CPU.

    Window k covers ids[k*stride : k*stride + window]; it scores (target not -100) only the targets that
    earlier windows did not, so each token after the first is predicted exactly once. The last window
    is padded: inputs with 0, targets with -100. Fewer than 2 ids are a UserError, raised here, before any batch.
    """
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} token(s); at least 2 are needed to measure a loss")
    return _window_batches(ids, window, stride, batch_size)


def _window_batches(ids: list[int], window: int, stride: int,
                    batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    starts = list(range(0, max(len(ids) - window, 0) + stride, stride))
    starts = [s for s in starts if s < len(ids) - 1]
    scored_until = 0  # targets ids[1 .. scored_until] are done
    for first in range(0, len(starts), batch_size):
        inputs, targets = [], []
        for start in starts[first:first + batch_size]:
            chunk = ids[start:start + window + 1]
            target = chunk[1:]
            already = max(0, scored_until - start)  # targets in this window that an earlier one scored
            target = [-100] * already + target[already:]
            scored_until = start + len(chunk) - 1
            pad = window - (len(chunk) - 1)
            inputs.append(chunk[:-1] + [0] * pad)
            targets.append(target + [-100] * pad)
        yield torch.tensor(inputs), torch.tensor(targets)


@torch.no_grad()
def sliding_window_loss(model: GPT, ids: list[int], window: int, stride: int, batch_size: int = 4) -> tuple[float, int]:
    """Mean next-token loss over a long token list, scoring every token once with up to `window` tokens of context
    (the windows of `sliding_window_batches`). Returns the loss and the number of tokens scored."""
    device = model.tok_emb.weight.device
    batches = sliding_window_batches(ids, window, stride, batch_size)
    total_loss, total_tokens = 0.0, 0
    progress = tqdm(total=len(ids) - 1, desc="evaluate", unit="tok", dynamic_ncols=True)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        counted = int((y != -100).sum())
        total_loss += model(x, targets=y).item() * counted  # the model's own loss: no (B, window, V) logits
        total_tokens += counted
        progress.update(counted)
    progress.close()
    return total_loss / total_tokens, total_tokens


def text_metrics(model: GPT, tokenizer: Tokenizer, text: str, window: int, stride: int,
                 batch_size: int = 4) -> dict[str, float]:
    """Loss, perplexity and bits per byte of `text` under `model`, by `sliding_window_loss` (see `loss_figures`)."""
    ids = tokenizer.encode(text)
    loss, scored = sliding_window_loss(model, ids, window, stride, batch_size)
    return loss_figures(tokenizer, ids, loss, scored)


def loss_figures(tokenizer: Tokenizer, ids: list[int], loss: float, scored: int) -> dict[str, float]:
    """Token counts, loss, perplexity and bits per byte of a text's `ids` whose `scored` predicted tokens
    (every one but the first) have mean loss `loss`.

    The first token has no context and is not predicted, so its bytes do not count:
    bits_per_byte = sum of the predicted tokens' losses (nats) / (ln 2 * their bytes),
    the bytes being the tokens' own (`decode_bytes`), exact even where a token ends
    inside a character. Leaving that one token out moves the figure by about one part
    in the text's token count, whatever the tokenizer.
    """
    scored_bytes = len(tokenizer.decode_bytes(ids[1:]))
    return {"tokens": len(ids), "scored_tokens": scored, "scored_bytes": scored_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss * scored / (math.log(2) * scored_bytes)}
