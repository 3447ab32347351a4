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
scored after the harness' prefix token (`prefix_token`: beginning-of-text if the vocabulary
has one, else end-of-text).

A request longer than the model's context is cut from the left, keeping the whole continuation.
Requests are scored in batches. The plain way (`continuation_loglikelihoods_reference`) runs
every request as its own row; the fast way (`continuation_loglikelihoods`) runs each distinct
context once and its choices after it from a KV cache, so the four choices of an MMLU
question cost one pass over the question; runs the start that contexts share (a subject's
few-shot examples) once; and computes logits only where a choice's token is predicted. The
tests hold both to transformers on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..model import GPT
from ..tokenizer import Tokenizer


MIN_SHARED_START = 16  # tokens: a shorter shared start is not worth running apart from the rest


@dataclass
class MultipleChoiceItem:
    context: str
    choices: list[str]
    answer: int  # index of the correct choice


def prefix_token(tokenizer: Tokenizer) -> int:
    """What an empty context stands for, as in the harness: beginning-of-text if the vocabulary has one
    (GPT-2's is its end-of-text), else end-of-text."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_loglikelihoods(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
    on_scored: Callable[[list[int]], None] | None = None,
) -> list[tuple[float, int, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-probability, its token count,
    and whether greedy decoding would have produced it (every token the argmax).

    The fast path (`continuation_loglikelihoods_reference` is the plain one, tested equal) runs no token
    twice where it can help it:

    - requests with the same context share it: it runs once, into a KV cache, and the last position
      scores every continuation's first token; each continuation longer than one token then runs on
      its own copy of the cache (the four answer texts of an MMLU question: one pass over the question);
    - contexts whose shared start is at least half of what they hold (a subject's few-shot examples)
      share it: it runs once, and each context's own remainder continues from a copy of its cache;
    - up to `batch_size` contexts run together, longest first, left-padded (all the contexts without
      a shared start in one stream of batches); the LM head runs only where a continuation token is
      predicted.

    `on_scored` hears the indices of the requests each batch finished.
    """
    limit = model.config.context_length + 1  # the last token is never an input
    contexts: dict[tuple[int, ...], list[int]] = {}  # a context (after the left cut) -> the requests that share it
    continuations: list[list[int]] = []
    for index, (context, continuation) in enumerate(requests):
        if len(continuation) >= limit:
            raise ValueError(f"a continuation of {len(continuation)} tokens leaves no context in the model's "
                             f"{model.config.context_length}")
        whole = (context + continuation)[-limit:]
        contexts.setdefault(tuple(whole[:-len(continuation)]), []).append(index)
        continuations.append(list(continuation))
    extra = {context: max(len(continuations[index]) for index in indices) - 1 for context, indices in contexts.items()}
    results: list[tuple[float, int, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for shared, group in _shared_start_groups(list(contexts)):
            prefix = _run_prefix(model, group[0][:shared], max(len(c) for c in group) + max(extra[c] for c in group))
            for batch in _batches(group, shared, extra, batch_size, model.config.context_length):
                members = [contexts[context] for context in batch]
                _score_batch(model, [context[shared:] for context in batch], prefix, members, continuations, results)
                if on_scored is not None:
                    on_scored([index for indices in members for index in indices])
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _shared_start_groups(contexts: list[tuple[int, ...]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The contexts in groups that begin with the same tokens, as (how many tokens they share, members);
    the contexts in no group come last, together, as sharing 0 tokens.

    Sorted, contexts that share a start are neighbours, and how much each shares with the next tells
    the groups apart: a group runs while its neighbours share at least what its first two share, and
    begins only where that is `MIN_SHARED_START` tokens or more and no less than what the next pair
    shares (a question that shows one example unlike its subject's others would otherwise cut the
    subject's shared start short). Every member keeps at least one token of its own: its last
    position scores its choices. A group whose start is under half of what its members hold runs
    with the rest: its own batches, too few to fill, would cost more than the start saves (an MMLU
    subject's header alone, at 0 shots; its examples, at K shots, are worth it).
    """
    ordered = sorted(contexts)
    common = [_common_length(a, b) for a, b in zip(ordered, ordered[1:])]  # common[i]: ordered[i] with [i + 1]
    groups: list[tuple[int, list[tuple[int, ...]]]] = []
    rest: list[tuple[int, ...]] = []
    i = 0
    while i < len(ordered):
        shared = common[i] if i < len(common) else 0
        if shared < MIN_SHARED_START or (i + 1 < len(common) and common[i + 1] > shared):
            rest.append(ordered[i])
            i += 1
            continue
        end = i + 1
        while end < len(common) and common[end] >= shared:
            end += 1
        members = ordered[i:end + 1]
        shared = min(shared, min(len(member) for member in members) - 1)
        if 2 * shared * len(members) >= sum(len(member) for member in members):
            groups.append((shared, members))
        else:
            rest.extend(members)
        i = end + 1
    return groups + ([(0, rest)] if rest else [])


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens `a` and `b` share at their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _run_prefix(model: GPT, prefix: tuple[int, ...], max_length: int) -> KVCache | None:
    """A one-row KV cache holding `prefix` (room for `max_length` positions), or None for no prefix."""
    if not prefix:
        return None
    cache = model.new_cache(1, min(max_length, model.config.context_length))
    model.hidden_states(torch.tensor([prefix], device=model.tok_emb.weight.device), cache)
    return cache


def _batches(
    group: list[tuple[int, ...]], shared: int, extra: dict[tuple[int, ...], int], batch_size: int, context_length: int
) -> list[list[tuple[int, ...]]]:
    """A group's contexts in batches of up to `batch_size`, longest first (similar lengths share a batch, and
    memory runs out early if at all), each batch fitting the model: the shared start, the widest remainder,
    and the longest continuation after it."""
    batches: list[list[tuple[int, ...]]] = []
    width = longest = 0
    for context in sorted(group, key=len, reverse=True):
        if batches and len(batches[-1]) < batch_size and shared + width + max(longest, extra[context]) <= context_length:
            batches[-1].append(context)
            longest = max(longest, extra[context])
        else:
            batches.append([context])
            width, longest = len(context) - shared, extra[context]
    return batches


def _score_batch(
    model: GPT, remainders: list[tuple[int, ...]], prefix: KVCache | None, members: list[list[int]],
    continuations: list[list[int]], results: list[tuple[float, int, bool] | None],
) -> None:
    """Score the continuations of one batch of distinct contexts, given as what follows the `prefix` cache
    they share (the whole context when there is none) (continuation_loglikelihoods)."""
    device = model.tok_emb.weight.device
    width = max(len(remainder) for remainder in remainders)
    ids = torch.zeros(len(remainders), width, dtype=torch.long)  # left-padded with 0
    real = torch.zeros(len(remainders), width, dtype=torch.bool)
    for row, remainder in enumerate(remainders):
        ids[row, width - len(remainder):] = torch.tensor(remainder)
        real[row, width - len(remainder):] = True
    longer = [(row, index) for row, indices in enumerate(members) for index in indices
              if len(continuations[index]) > 1]
    extra = max((len(continuations[index]) - 1 for _, index in longer), default=0)
    if prefix is None:
        cache = model.new_cache(len(remainders), width + extra)
    else:  # each row continues its own copy of the shared start
        cache = prefix.select_rows(torch.zeros(len(remainders), dtype=torch.long, device=device))
    padding_mask = None if bool(real.all()) else real.to(device)
    last = model.hidden_states(ids.to(device), cache, padding_mask)[:, -1]  # (B, D)
    first = torch.log_softmax(model.lm_head(last).float(), dim=-1)  # (B, V): each continuation's first token
    for row, indices in enumerate(members):
        for index in indices:
            token = continuations[index][0]
            results[index] = (float(first[row, token]), 1, int(first[row].argmax()) == token)
    if not longer:
        return
    # Each longer continuation continues its own copy of its context's cache, all in one pass.
    cache = cache.select_rows(torch.tensor([row for row, _ in longer], device=device))
    inputs = torch.zeros(len(longer), extra, dtype=torch.long)  # continuation[:-1], right-padded with 0
    for i, (_, index) in enumerate(longer):
        inputs[i, :len(continuations[index]) - 1] = torch.tensor(continuations[index][:-1])
    hidden = model.hidden_states(inputs.to(device), cache)  # (R, extra, D)
    predicting = torch.cat([hidden[i, :len(continuations[index]) - 1] for i, (_, index) in enumerate(longer)])
    logprobs = torch.log_softmax(model.lm_head(predicting).float(), dim=-1)  # (sum of lengths - 1, V)
    targets = torch.tensor([t for _, index in longer for t in continuations[index][1:]], device=device)
    token_logprobs = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    hits = (logprobs.argmax(dim=-1) == targets).tolist()
    offset = 0
    for _, index in longer:
        n = len(continuations[index]) - 1
        total, _, greedy = results[index]  # type: ignore[misc]
        results[index] = (total + sum(token_logprobs[offset:offset + n]), n + 1, greedy and all(hits[offset:offset + n]))
        offset += n


@torch.no_grad()
def continuation_loglikelihoods_reference(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[tuple[float, int, bool]]:
    """The plain version of `continuation_loglikelihoods`: one right-padded row per request, every logit
    computed. A causal model's logits at a position do not depend on what follows, so padding needs no mask."""
    device = model.tok_emb.weight.device
    limit = model.config.context_length + 1
    sequences = [(context + continuation)[-limit:] for context, continuation in requests]
    results = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(requests), batch_size):
            batch = sequences[start:start + batch_size]
            ids = torch.zeros(len(batch), max(len(s) - 1 for s in batch), dtype=torch.long)  # right-padded
            for row, sequence in enumerate(batch):
                ids[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
            logprobs = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, T, V)
            for row, sequence in enumerate(batch):
                n, end = len(requests[start + row][1]), len(sequence) - 1
                targets = torch.tensor(sequence[-n:], device=device)  # (n,)
                scores = logprobs[row, end - n:end]  # (n, V): the positions predicting the continuation
                results.append((float(scores.gather(1, targets[:, None]).sum()), n,
                                bool((scores.argmax(dim=-1) == targets).all())))
    finally:
        model.train(was_training)
    return results


def score_items(
    model: GPT, tokenizer: Tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8,
    on_items_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """Every choice of every item scored: per item its log-likelihoods, token counts and the three picks.
    `on_items_done` hears how many more items have every choice scored, batch by batch (a progress bar)."""
    requests, owners = [], []
    for index, item in enumerate(items):
        for choice in item.choices:
            requests.append(encode_pair(tokenizer, item.context, choice))
            owners.append(index)
    unscored = [len(item.choices) for item in items]

    def count_finished(indices: list[int]) -> None:
        finished = 0
        for index in indices:
            unscored[owners[index]] -= 1
            finished += unscored[owners[index]] == 0
        if on_items_done is not None and finished:
            on_items_done(finished)

    scores = continuation_loglikelihoods(model, requests, batch_size, count_finished)
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
