"""Ensembles of language models: several models that share a tokenizer, read as one.

The ensemble's next-token distribution is the mean of its n members' distributions,

    p(t | context) = 1/n * sum_i softmax(logits_i)(t)

the mean of probabilities, not of logits: each member keeps the tokens it is sure of,
and a token that one member rules out stays possible when another expects it. Its loss
on a target token is -log p(target), computed from the members' log-probabilities as
logsumexp_i log p_i(target) - log n, which never leaves log space (`mixture_log_probs`).

What the members must share, and what they may not:

- **The tokenizer.** Averaging probabilities of token ids only means something when an
  id is the same token in every member: the vocabularies (every id's bytes, the special
  tokens) must be equal and split text the same way (`check_shared_tokenizer`); other
  tokenizers are a UserError naming both models.
- **The vocabulary size may differ.** A model may have more embedding rows than its
  tokenizer has tokens (padding rows no text ever uses). Each member's distribution is
  taken over the tokenizer's `n_vocab` tokens alone, so a member's figure can differ from
  its single-model one in the last digits when its padding rows hold probability.
- **The context** is the smallest member's.

`Ensemble` does what the verbs need: the sliding-window loss, perplexity and bits per
byte of a text, with each member's own figures from the same pass (`text_metrics`), and
generation (`stream_tokens`, `generate`), every member decoding with its own KV cache.
Temperature, top-k and top-p apply to the averaged distribution, as they apply to one
model's. Classifiers average their class probabilities the same way (`python -m gpt
classify` with the checkpoint repeated, `gpt.classifier.ensemble_probabilities`); there
the members need the same labels, not the same tokenizer: each reads the text its own way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError
from .evaluate.language_model import loss_figures, sliding_window_batches
from .generate import _left_pad, mark_finished, next_token_logits_function, sample_next_token
from .model import GPT
from .tokenizer import Tokenizer

# Text whose split tells apart tokenizers with one vocabulary but other rules (GPT-2's words
# with digit runs, SmolLM2's digit by digit): contractions, numbers, spaces, accents, CJK.
TOKENIZER_PROBE = "It's 2024: naïve café, 東京 and   spaced\tout x  1 12345.67 words!\n"

HEAD_ROWS = 256  # hidden states per LM-head product when scoring: a (256, vocab) logits block at a time


def mixture_log_probs(member_log_probs: torch.Tensor) -> torch.Tensor:
    """log of the mean of the members' probabilities: (n, ...) log-probabilities -> (...).

    log(1/n * sum_i exp(l_i)) = logsumexp_i(l_i) - log n, stable for any l_i (even -inf)."""
    return torch.logsumexp(member_log_probs, dim=0) - math.log(member_log_probs.shape[0])


def token_log_probs(logits: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """A member's log-probabilities over the tokenizer's `n_vocab` tokens: (..., V) logits -> (..., n_vocab)
    float32 (padding rows beyond the tokenizer's tokens dropped before the softmax)."""
    return F.log_softmax(logits[..., :n_vocab].float(), dim=-1)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether `a` and `b` tokenize alike: the same vocabulary (every id's bytes, the special tokens, the
    end-of-text id) and the same split of `TOKENIZER_PROBE`."""
    if a is b:
        return True
    return (a.n_vocab == b.n_vocab and a.special_tokens == b.special_tokens and a.eot_id == b.eot_id
            and all(a.decode_bytes([i]) == b.decode_bytes([i]) for i in range(a.n_vocab))
            and a.encode(TOKENIZER_PROBE) == b.encode(TOKENIZER_PROBE))


def check_shared_tokenizer(names: Sequence[str], tokenizers: Sequence[Tokenizer]) -> None:
    """UserError naming the first member whose tokenizer is not the first member's, and both tokenizers."""
    for name, tokenizer in zip(names[1:], tokenizers[1:]):
        if not same_tokenizer(tokenizers[0], tokenizer):
            raise UserError(
                f"an ensemble needs one tokenizer: {names[0]} uses {tokenizers[0].name} ({tokenizers[0].n_vocab:,} "
                f"tokens) but {name} uses {tokenizer.name} ({tokenizer.n_vocab:,} tokens); averaging next-token "
                "probabilities needs every token id to mean the same token in every model")


class Ensemble:
    """Language models that share `tokenizer`, read as the mean of their next-token distributions.

    `names` say where each member came from (for messages and per-member figures). The members
    must be on one device, in eval mode; `context_length` is the smallest member's.
    """

    def __init__(self, members: Sequence[GPT], names: Sequence[str], tokenizer: Tokenizer) -> None:
        if len(members) < 2 or len(members) != len(names):
            raise ValueError(f"an ensemble needs two or more members, each with a name; got {len(members)} "
                             f"members and {len(names)} names")
        devices = {member.tok_emb.weight.device for member in members}
        if len(devices) > 1:
            raise ValueError(f"the members are on several devices: {sorted(map(str, devices))}")
        for name, member in zip(names, members):
            if member.config.vocab_size < tokenizer.n_vocab:
                raise UserError(f"{name}: {member.config.vocab_size:,} token rows, fewer than the tokenizer's "
                                f"{tokenizer.n_vocab:,} tokens")
        self.members = list(members)
        self.names = list(names)
        self.tokenizer = tokenizer
        self.context_length = min(member.config.context_length for member in members)
        self.device = devices.pop()

    # ------------------------------------------------------------------ scoring a text

    @torch.no_grad()
    def target_log_probs(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each member's log-probability of every scored target: inputs, targets (B, T) -> (n, N), N = the
        targets that are not -100, in row-major order. Logits are made `HEAD_ROWS` rows at a time, and only
        where a target is scored."""
        scored = targets != -100  # (B, T)
        wanted = targets[scored]  # (N,)
        per_member = []
        for member in self.members:
            hidden = member.hidden_states(inputs)[scored]  # (N, D)
            parts = [token_log_probs(member.lm_head(hidden[first:first + HEAD_ROWS]), self.tokenizer.n_vocab)
                     .gather(1, wanted[first:first + HEAD_ROWS, None])[:, 0]  # (rows,)
                     for first in range(0, len(wanted), HEAD_ROWS)]
            per_member.append(torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32))
        return torch.stack(per_member)  # (n, N)

    def text_metrics(self, text: str, window: int, stride: int, batch_size: int = 4) -> dict:
        """Loss, perplexity and bits per byte of `text` under the ensemble (the windows of
        `gpt.evaluate.language_model.sliding_window_batches`, as one model is scored), and under each member
        from the same pass: {..."members": [{"model": name, "loss", "perplexity", "bits_per_byte"}, ...]}."""
        if window > self.context_length:
            raise UserError(f"window {window} exceeds the ensemble's context length ({self.context_length}, "
                            "the smallest member's)")
        ids = self.tokenizer.encode(text)
        batches = sliding_window_batches(ids, window, stride, batch_size)
        mixture_sum, member_sums, scored = 0.0, torch.zeros(len(self.members), dtype=torch.float64), 0
        with tqdm(total=len(ids) - 1, desc="evaluate", unit="tok", dynamic_ncols=True) as progress:
            for x, y in batches:
                log_probs = self.target_log_probs(x.to(self.device), y.to(self.device))  # (n, N)
                mixture_sum -= float(mixture_log_probs(log_probs).double().sum())
                member_sums -= log_probs.double().sum(dim=1).cpu()
                scored += log_probs.shape[1]
                progress.update(log_probs.shape[1])
        members = []
        for name, total in zip(self.names, member_sums.tolist()):
            figures = loss_figures(self.tokenizer, ids, total / scored, scored)
            members.append({"model": name, **{key: figures[key] for key in ("loss", "perplexity", "bits_per_byte")}})
        return {**loss_figures(self.tokenizer, ids, mixture_sum / scored, scored), "members": members}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def stream_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """`gpt.generate.stream_tokens` for the ensemble: yield the next token of every row (B,) at each step,
        drawn from the averaged distribution (temperature 0: its most likely token); a finished row keeps
        yielding its eos id. Prompts may differ in length (left-padded); each member keeps its own KV cache."""
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > self.context_length:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"ensemble's context_length ({self.context_length})")
        eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long,
                               device=self.device)
        ids, padding_mask = _left_pad(prompts, self.device)  # (B, T), (B, T) or None
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        caches = [member.new_cache(len(prompts), longest + max_new_tokens) for member in self.members]
        heads = [next_token_logits_function(member, len(prompts)) for member in self.members]
        step_input = ids
        for _ in range(max_new_tokens):
            log_probs = torch.stack([
                token_log_probs(head(member.hidden_states(step_input, cache=cache, padding_mask=padding_mask)[:, -1]),
                                self.tokenizer.n_vocab)
                for member, cache, head in zip(self.members, caches, heads)])  # (n, B, n_vocab)
            padding_mask = None  # only the prompt is padded; new tokens are real in every row
            # log p is a valid "logits": softmax(log p / temperature) is p sharpened or flattened.
            next_token = sample_next_token(mixture_log_probs(log_probs), temperature, top_k, top_p, generator)  # (B,)
            next_token = mark_finished(next_token, finished, eos_ids)
            yield next_token
            if bool(finished.all()):
                return
            step_input = next_token[:, None]  # (B, 1)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
        """Each prompt continued by up to `max_new_tokens` tokens (prompt + new tokens, ending at the first eos,
        included), as `gpt.generate.generate` returns lists."""
        prompts = [list(p) for p in prompts]
        steps = list(self.stream_tokens(prompts, max_new_tokens, temperature, eos_id=eos_id, generator=generator))
        new_tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
        result = []
        for prompt, row in zip(prompts, new_tokens):
            stop = next((i + 1 for i, token in enumerate(row) if token == eos_id), len(row))
            result.append(prompt + row[:stop])
        return result
