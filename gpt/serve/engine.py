"""The inference engine behind `python -m gpt serve`: continuous batching on one scheduler thread.

Callers `submit` requests from any thread; one scheduler thread owns the model and serves
every request together. Each iteration of its loop:

1. **Admit.** Queued requests move into free slots of the `SlotCache` (up to `max_batch`).
   Each admitted prompt is prefilled alone: one forward through a fresh one-row `KVCache`,
   exactly what `gpt.generate` does for one prompt. Its keys and values are copied into the
   request's slot and its first token is sampled from the prefill's logits.
2. **Step.** ONE forward of one token per slot, all slots together (`GPT.hidden_states` on
   the slot cache, then the LM head), so the weights stream from memory once for every request.
3. **Sample and retire.** Each active row is sampled with its request's own generator and
   settings (`gpt.generate.sample_next_token` on that row's logits), its `TokenEvent` is
   emitted, and requests that hit a stop token, their `max_tokens` or a cancel are retired:
   their slot is free for the next iteration's admissions.

Requests that arrive while others decode join at the next iteration; a cancel frees the slot
at the next iteration too. An exception while serving one request (prefill, sampling, its
callback) fails that request alone with `Finished("error")`; only an exception in the shared
forward fails the requests in it. The engine keeps serving either way.

**Batch invariance** (gpt/serve/batch_invariance.py): a request's logits are bitwise the same
alone or among others, because every step has one fixed shape (free slots decode a dummy
token), attention runs row by row, and prefill and sampling are per request.

The request's side of the interface (SamplingParams, TokenEvent, Finished, RequestHandle,
QueueFull) lives in gpt/serve/request.py and is imported from here too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from ..generate import next_token_logits_function, sample_next_token
from ..model import GPT
from .batch_invariance import invariant_step_width
from .request import Event, Finished, QueueFull, RequestHandle, SamplingParams, TokenEvent
from .slot_cache import SlotCache

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    """The engine's side of a request."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    generator: torch.Generator
    stop_ids: frozenset[int]
    slot: int = -1
    last_token: int = 0
    completion_tokens: int = 0


class Engine:
    """Continuous batching over one model: `submit` from any thread, events from the scheduler thread."""

    def __init__(
        self,
        model: GPT,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        eos_ids: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        max_context: int | None = None,
    ) -> None:
        context_length = model.config.context_length
        max_context = max_context or min(context_length, 4096)
        if not 1 <= max_context <= context_length:
            raise ValueError(f"max_context must be in [1, {context_length}] (the model's context), got {max_context}")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()  # the engine owns the model: no dropout, ever
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.eos_ids = frozenset(eos_ids)
        weight = model.tok_emb.weight
        self.device = weight.device
        self.dtype = dtype
        cache_dtype = dtype or weight.dtype  # under autocast the keys and values come in its dtype
        self.width = invariant_step_width(model, max_batch, self._autocast, cache_dtype)  # rows per step, >= max_batch
        self.cache = SlotCache(model.config, self.width, max_context, device=weight.device, dtype=cache_dtype)
        self._prefill_head = next_token_logits_function(model, 1)  # hidden (1, D) -> logits (1, V), as generate
        self._step_head = next_token_logits_function(model, self.width)  # hidden (width, D) -> (width, V)

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # slot -> request
        self._jobs: list[tuple[Callable[[], Any], Future]] = []  # run on the scheduler thread between steps
        self._completed = 0
        self._closing = False
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._running = False
        self._inline_lock = threading.Lock()  # score() when no scheduler thread runs

    # ------------------------------------------------------------------ public interface

    def start(self) -> None:
        """Start the scheduler thread (a daemon)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the engine was already started")
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="gpt-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop admitting; let running and queued requests finish for up to `drain_seconds`, cancel the rest."""
        with self._lock:
            self._closing = True
            self._drain_deadline = time.monotonic() + drain_seconds
            self._wakeup.notify_all()
            thread = self._thread
            orphans = list(self._queue) if thread is None else []
            if thread is None:
                self._queue.clear()
        for request in orphans:  # never started: nothing will serve them
            self._finish(request, "cancelled")
        if thread is not None:
            thread.join()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> RequestHandle:
        """Queue a request; `on_event` gets its TokenEvents then one Finished, in order, on the engine thread.

        Raises ValueError for a bad prompt or parameters, QueueFull when `max_queue` requests
        already wait, RuntimeError once `shutdown` has begun.
        """
        prompt = list(prompt_ids)
        self._check(prompt, params)
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        handle = RequestHandle(f"req-{uuid.uuid4().hex[:12]}", self._wake)
        request = _Request(handle, prompt, params, on_event, generator,
                           stop_ids=frozenset(params.stop_token_ids) | self.eos_ids)
        with self._lock:
            if self._closing or (self._thread is not None and not self._running):
                raise RuntimeError("the engine is shutting down" if self._closing else "the engine has stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait (max_queue {self.max_queue})")
            self._queue.append(request)
            self._wakeup.notify()
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[TokenEvent], Finished]:
        """Submit and wait: the request's TokenEvents and its Finished (for tests and benchmarks)."""
        if not self._running:
            raise RuntimeError("the engine is not running: call start() first")
        events: list[Event] = []
        done = threading.Event()

        def collect(event: Event) -> None:
            events.append(event)
            if isinstance(event, Finished):
                done.set()

        self.submit(prompt_ids, params, collect)
        done.wait()
        return events[:-1], events[-1]  # type: ignore[return-value]

    def score(self, prompt_ids: list[int], top_k: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Per prompt token: its logprob given the tokens before (None for the first), and the top_k alternatives.

        One forward of the whole prompt, run on the scheduler thread between steps (inline when
        no scheduler runs). For echo + logprobs scoring (lm-evaluation-harness).
        """
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > self.model.config.context_length:
            raise ValueError(f"prompt ({len(prompt)} tokens) exceeds the model's context of "
                             f"{self.model.config.context_length} tokens")
        self._check_ids(prompt)
        if not 0 <= top_k <= self.model.config.vocab_size:
            raise ValueError(f"top_k must be in [0, {self.model.config.vocab_size}], got {top_k}")
        future: Future = Future()
        with self._lock:
            queued = self._running
            if queued:
                self._jobs.append((lambda: self._score(prompt, top_k), future))
                self._wakeup.notify()
        if queued:
            return future.result()
        with self._inline_lock:
            return self._score(prompt, top_k)

    @property
    def stats(self) -> dict[str, int]:
        """Requests decoding now, waiting, and finished so far (for /health and logs)."""
        with self._lock:
            return {"active": len(self._active), "queued": len(self._queue), "completed": self._completed}

    # ------------------------------------------------------------------ validation

    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        self._check_ids(prompt)
        if params.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{len(prompt) + params.max_tokens} exceeds the context of {self.max_context} tokens")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k is not None and params.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {params.top_k}")
        if params.logprobs is not None and not 0 <= params.logprobs <= self.model.config.vocab_size:
            raise ValueError(f"logprobs must be in [0, {self.model.config.vocab_size}], got {params.logprobs}")

    def _check_ids(self, prompt: list[int]) -> None:
        vocab_size = self.model.config.vocab_size
        if not all(0 <= token < vocab_size for token in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        error: BaseException | None = None
        try:
            with torch.no_grad(), self._autocast():
                while self._iterate():
                    pass
        except BaseException as exc:  # a bug in the loop itself: fail everything rather than hang clients
            log.exception("the engine's scheduler loop failed")
            error = exc
        finally:
            with self._lock:
                self._running = False
                jobs, self._jobs = self._jobs, []
            self._run_jobs(jobs)  # submitted before the loop ended
            self._end_all("cancelled" if error is None else "error", None if error is None else repr(error))

    def _iterate(self) -> bool:
        """One iteration: score jobs, cancelled requests out, admissions, one step. False: time to stop."""
        with self._lock:
            while not (self._queue or self._active or self._jobs or self._closing):
                self._wakeup.wait()
            jobs, self._jobs = self._jobs, []
            cancelled = [request for request in self._queue if request.handle.cancelled]
            for request in cancelled:
                self._queue.remove(request)
            idle = not (self._queue or self._active)
            stop = self._closing and (idle or time.monotonic() >= self._drain_deadline)
        self._run_jobs(jobs)
        for request in cancelled:
            self._finish(request, "cancelled")
        if stop:
            return False
        for request in list(self._active.values()):
            if request.handle.cancelled:
                self._retire(request, "cancelled")
        with self._lock:
            admitted = self._take_admissions()
        for request in admitted:
            self._admit(request)
        if self._active:
            self._step()
        return True

    def _take_admissions(self) -> list[_Request]:
        """Move queued requests into free slots, lowest first (the lock is held)."""
        free = [slot for slot in range(self.max_batch) if slot not in self._active]
        admitted = []
        for slot in free[: len(self._queue)]:
            request = self._queue.popleft()
            request.slot = slot
            self._active[slot] = request
            admitted.append(request)
        return admitted

    def _admit(self, request: _Request) -> None:
        """Prefill the request's prompt alone, exactly as `generate` would, into its slot; emit its first token."""
        if request.params.max_tokens == 0:
            self._retire(request, "length")
            return
        try:
            prompt = torch.tensor([request.prompt], device=self.device)  # (1, T)
            prefill = self.model.new_cache(1, len(request.prompt))
            hidden = self.model.hidden_states(prompt, cache=prefill)[:, -1]  # (1, D)
            logits = self._prefill_head(hidden)  # (1, V)
            self.cache.store_prompt(request.slot, prefill)
        except Exception as error:
            self._fail(request, error)
            return
        self._advance(request, logits)

    def _step(self) -> None:
        """One forward of every slot's last token together; then sample, emit and retire row by row."""
        requests = list(self._active.values())
        tokens = [0] * self.width  # a free row decodes a dummy token: the step's shape never changes
        for request in requests:
            tokens[request.slot] = request.last_token
        try:
            ids = torch.tensor(tokens, device=self.device)[:, None]  # (width, 1)
            hidden = self.model.hidden_states(ids, cache=self.cache)[:, -1]  # (width, D)
            logits = self._step_head(hidden)  # (width, V)
        except Exception as error:  # the shared forward: every request in it fails
            for request in requests:
                self._fail(request, error)
            return
        for request in requests:
            self._advance(request, logits[request.slot : request.slot + 1])

    def _advance(self, request: _Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits (1, V), emit it, retire the request if it is done."""
        try:
            event = self._sample(request, logits)
            request.on_event(event)
        except Exception as error:
            self._fail(request, error)
            return
        request.last_token = event.token_id
        request.completion_tokens += 1
        if event.token_id in request.stop_ids:
            self._retire(request, "stop")
        elif request.completion_tokens >= request.params.max_tokens:
            self._retire(request, "length")

    @staticmethod
    def _sample(request: _Request, logits: torch.Tensor) -> TokenEvent:
        """`sample_next_token` on this row alone with the request's generator, plus its logprobs if asked."""
        p = request.params
        token_id = int(sample_next_token(logits, p.temperature, p.top_k, p.top_p, request.generator))
        if p.logprobs is None:
            return TokenEvent(token_id, None, None)
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # (V,) of the raw logits
        top = logprobs.topk(p.logprobs)
        return TokenEvent(token_id, float(logprobs[token_id]), list(zip(top.indices.tolist(), top.values.tolist())))

    def _score(self, prompt: list[int], top_k: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        ids = torch.tensor([prompt], device=self.device)  # (1, T)
        with torch.no_grad(), self._autocast():
            logits = self.model(ids)[0]  # (T, V): row t predicts token t + 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:-1]  # (T - 1, V)
        chosen = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()  # (T - 1,)
        top = logprobs.topk(top_k, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return [(None, [])] + list(zip(chosen, alternatives))

    # ------------------------------------------------------------------ retiring requests

    def _fail(self, request: _Request, error: Exception) -> None:
        log.warning("request %s failed", request.handle.request_id, exc_info=error)
        self._retire(request, "error", f"{type(error).__name__}: {error}")

    def _retire(self, request: _Request, reason: str, error: str | None = None) -> None:
        """Free the request's slot and send its Finished."""
        with self._lock:
            if self._active.get(request.slot) is request:
                del self._active[request.slot]
                self.cache.release(request.slot)
        self._finish(request, reason, error)

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        with self._lock:
            self._completed += 1
        try:
            request.on_event(Finished(reason, len(request.prompt), request.completion_tokens, error))
        except Exception:
            log.exception("the event callback of request %s failed on Finished", request.handle.request_id)

    def _end_all(self, reason: str, error: str | None) -> None:
        """Finish every queued and active request (the loop is over)."""
        with self._lock:
            queued, self._queue = list(self._queue), deque()
            active = list(self._active.values())
        for request in active:
            self._retire(request, reason, error)
        for request in queued:
            self._finish(request, reason, error)

    # ------------------------------------------------------------------ helpers

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    @staticmethod
    def _run_jobs(jobs: list[tuple[Callable[[], Any], Future]]) -> None:
        for job, future in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except Exception as error:
                    future.set_exception(error)
