"""What a request to the serving engine is: its sampling parameters, the events it receives, its handle.

A caller hands `Engine.submit` a prompt, `SamplingParams` and a callback; the callback then
receives one `TokenEvent` per generated token and, last, exactly one `Finished`. The
returned `RequestHandle` cancels the request from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How one request decodes (the semantics of `gpt.generate.sample_next_token`)."""

    max_tokens: int  # >= 0 new tokens
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # a per-request torch.Generator seeded with it; None = a random seed
    stop_token_ids: tuple[int, ...] = ()  # ends after emitting one (finish "stop"); so do the engine's eos_ids
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's plus the k most likely


@dataclass
class TokenEvent:
    """One generated token."""

    token_id: int
    logprob: float | None  # log-softmax of the raw logits (before temperature, top-k, top-p), float32
    top_logprobs: list[tuple[int, float]] | None  # k (token_id, logprob), most likely first


@dataclass
class Finished:
    """Always the last event of a request."""

    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | Finished


class QueueFull(Exception):
    """`submit` while `max_queue` requests already wait."""


class RequestHandle:
    """A submitted request: its id, and `cancel()` (thread-safe; `Finished("cancelled")` still follows)."""

    def __init__(self, request_id: str, wake: Callable[[], None]) -> None:
        self.request_id = request_id
        self._cancelled = threading.Event()
        self._wake = wake

    def cancel(self) -> None:
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
