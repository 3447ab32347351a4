"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores MMLU, HellaSwag or ARC.

An item is a context and its choices; the model's answer is the choice whose tokens are
most likely after the context:

    loglikelihood(choice) = sum over the choice's tokens t of log p(t | context, tokens before t)

Three ways to pick the best choice, all reported:

    acc            the largest summed log-likelihood
    acc_norm       the largest log-likelihood divided by the choice's length in characters
                   (the harness' `acc_norm`: longer answers are not penalized for their length)
    acc_per_token  the largest mean log-likelihood per token

The token split follows the harness exactly (`encode_pair`): whitespace at the end of the
context moves to the start of the continuation, the pair is encoded whole, and the
continuation is what the whole has beyond the context's own tokens. An empty context is
scored after the end-of-text token.

Requests are scored in batches, right-padded: a causal model's logits at a position do not
depend on what follows it, so padding needs no mask. A request longer than the context is
cut from the left, keeping the whole continuation. One-token continuations of the same
context share a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import GPT
from ..tokenizer import Tokenizer


@dataclass
class MultipleChoiceItem:
    context: str
    choices: list[str]
    answer: int  # index of the correct choice


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_loglikelihoods(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[tuple[float, int, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-probability, its token count,
    and whether greedy decoding would have produced it (every token the argmax).

    Requests whose continuation is one token and whose inputs are the same (the letters A-D after one
    MMLU question) share one forward pass: its last position scores them all.
    """
    device = model.tok_emb.weight.device
    limit = model.config.context_length + 1  # the last token is never an input
    sequences = [(context + continuation)[-limit:] for context, continuation in requests]
    row_of: dict[tuple[int, ...], int] = {}  # a distinct input sequence -> its row among all forwards
    distinct: list[list[int]] = []  # the input of each row
    users: list[list[int]] = []  # the requests each row scores
    for index, sequence in enumerate(sequences):
        key = tuple(sequence[:-1]) if len(requests[index][1]) == 1 else (index, -1)  # (index, -1): never shared
        if key not in row_of:
            row_of[key] = len(distinct)
            distinct.append(sequence[:-1])
            users.append([])
        users[row_of[key]].append(index)
    results: list[tuple[float, int, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start:start + batch_size]
            ids = torch.zeros(len(batch), max(len(s) for s in batch), dtype=torch.long)  # right-padded with 0
            for row, sequence in enumerate(batch):
                ids[row, :len(sequence)] = torch.tensor(sequence)
            logprobs = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, T, V)
            for row in range(start, start + len(batch)):
                for index in users[row]:
                    n, end = len(requests[index][1]), len(distinct[row])
                    targets = torch.tensor(sequences[index][-n:], device=device)  # (n,)
                    scores = logprobs[row - start, end - n:end]  # (n, V): the positions predicting the continuation
                    total = float(scores.gather(1, targets[:, None]).sum())
                    results[index] = (total, n, bool((scores.argmax(dim=-1) == targets).all()))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def score_items(
    model: GPT, tokenizer: Tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8
) -> list[dict]:
    """Every choice of every item scored: per item its log-likelihoods, token counts and the three picks."""
    requests, owners = [], []
    for index, item in enumerate(items):
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, choice))
            owners.append(index)
    scores = continuation_loglikelihoods(model, requests, batch_size)
    scored: list[dict] = [{"answer": item.answer, "loglikelihoods": [], "tokens": []} for item in items]
    for owner, (loglikelihood, tokens, _) in zip(owners, scores):
        scored[owner]["loglikelihoods"].append(loglikelihood)
        scored[owner]["tokens"].append(tokens)
    for item, entry in zip(items, scored):
        entry["chars"] = [len(choice) for choice in item.choices]
        lls = entry["loglikelihoods"]
        entry["pred"] = _argmax(lls)
        entry["pred_norm"] = _argmax([ll / max(chars, 1) for ll, chars in zip(lls, entry["chars"])])
        entry["pred_per_token"] = _argmax([ll / max(n, 1) for ll, n in zip(lls, entry["tokens"])])
    return scored


def multiple_choice_metrics(scored: Sequence[dict]) -> dict[str, float]:
    """acc, acc_norm and acc_per_token over scored items (module docstring)."""
    count = max(len(scored), 1)
    return {name: sum(entry[pick] == entry["answer"] for entry in scored) / count
            for name, pick in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_per_token", "pred_per_token"))}


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (ties go to the earlier choice, as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
