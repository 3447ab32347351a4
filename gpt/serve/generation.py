"""One HTTP request's generation: its engine requests, bridged into asyncio, decoded into text.

The engine calls `on_event` from its own thread; `Generation` moves each event onto the
event loop (`loop.call_soon_threadsafe` into an `asyncio.Queue`) and turns tokens into
text with `ChoiceText`, which

* never releases half a UTF-8 character (a multi-byte character can span tokens: the
  tokenizer's stream decoder holds the incomplete bytes back), and
* holds back text that could be the start of a stop sequence until it is decided: when a
  stop sequence appears, the text is cut before it, the choice finishes with "stop", and
  its engine request is cancelled.

A request with `n` choices (or several prompts) is several engine requests, one `Slot`
each; `Generation.updates()` yields their progress in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .engine import Engine
from .protocol import TokenLogprob
from .request import Finished, RequestHandle, SamplingParams, TokenEvent


class GenerationError(Exception):
    """The engine failed (or dropped) a request; the message says why."""


class ChoiceText:
    """The text of one choice, released as far as it is certain."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], start_offset: int = 0) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stops = tuple(stops)
        self._start_offset = start_offset  # where this text starts in the response's text (after an echoed prompt)
        self.text = ""  # everything decoded so far, cut at a stop sequence once one is found
        self.released = 0  # characters of `text` handed out
        self.stopped = False  # a stop sequence was found

    @property
    def offset(self) -> int:
        """Where the next token's text will start (completions' `text_offset`)."""
        return self._start_offset + len(self.text)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now certain (possibly "")."""
        return self._advance(self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        """The end of generation: return everything still held back (up to a stop sequence)."""
        return self._advance(self._decoder.flush(), final=True)

    def _advance(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.text += piece
        # A stop sequence cannot start before `released`: text that could begin one is never released.
        hits = [i for i in (self.text.find(stop, self.released) for stop in self._stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._held_back()
        released, self.released = self.text[self.released:end], end
        return released

    def _held_back(self) -> int:
        """The longest unreleased tail of the text that is the beginning of a stop sequence."""
        pending = len(self.text) - self.released
        for length in range(min(pending, max((len(s) - 1 for s in self._stops), default=0)), 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0


@dataclass
class Slot:
    """One engine request: one choice of the response."""

    index: int  # the choice's index in the response
    prompt_ids: list[int]
    params: SamplingParams
    text: ChoiceText
    handle: RequestHandle | None = None
    completion_tokens: int = 0  # tokens the engine generated for it (an end-of-text token included)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # generated tokens, with logprobs when asked
    finish_reason: str | None = None  # "stop" | "length" once decided


@dataclass
class Update:
    """What one engine event changed: new text and tokens of a slot, and whether the slot is done."""

    slot: Slot
    text: str
    tokens: list[TokenLogprob]
    done: bool


class Generation:
    """The engine requests of one HTTP request, with their events delivered on the running event loop."""

    def __init__(self, engine: Engine, slots: list[Slot], eos_ids: Sequence[int]) -> None:
        self.engine = engine
        self.slots = slots
        self.eos_ids = frozenset(eos_ids)
        self.first_token_at: float | None = None  # time.perf_counter() of the first generated token
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, TokenEvent | Finished]] = asyncio.Queue()

    def submit(self) -> None:
        """Queue every slot's request in the engine; if one is refused (QueueFull, ValueError), cancel those
        already queued and let the error through."""
        try:
            for number, slot in enumerate(self.slots):
                slot.handle = self.engine.submit(slot.prompt_ids, slot.params,
                                                 lambda event, number=number: self._deliver(number, event))
        except BaseException:
            self.cancel()
            raise

    def _deliver(self, number: int, event: TokenEvent | Finished) -> None:
        """Called on the engine's thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (number, event))
        except RuntimeError:  # the event loop has closed: nobody is waiting for this request any more
            pass

    def cancel(self) -> None:
        """Cancel the engine requests that are still running (the client left, or a stop sequence was found)."""
        for slot in self.slots:
            if slot.handle is not None and slot.finish_reason is None:
                slot.handle.cancel()

    async def updates(self) -> AsyncIterator[Update]:
        """Progress of every slot until all are done. Raises GenerationError if the engine fails one."""
        open_slots = len(self.slots)
        while open_slots:
            number, event = await self._events.get()
            slot = self.slots[number]
            if slot.finish_reason is not None:  # events that were on their way when we cancelled it
                continue
            if isinstance(event, TokenEvent):
                update = self._on_token(slot, event)
            else:
                update = self._on_finished(slot, event)
            if update.done:
                open_slots -= 1
            yield update

    def _on_token(self, slot: Slot, event: TokenEvent) -> Update:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        slot.completion_tokens += 1
        if event.token_id in self.eos_ids:  # the end of the text: no text, no logprob entry
            return Update(slot, "", [], done=False)
        token = TokenLogprob(event.token_id, event.logprob, event.top_logprobs, slot.text.offset)
        slot.logprobs.append(token)
        text = slot.text.push(event.token_id)
        if slot.text.stopped:
            slot.finish_reason = "stop"
            if slot.handle is not None:
                slot.handle.cancel()
        return Update(slot, text, [token], done=slot.text.stopped)

    def _on_finished(self, slot: Slot, event: Finished) -> Update:
        if event.reason not in ("stop", "length"):
            self.cancel()
            why = event.error or ("the request was cancelled by the engine (the server may be shutting down)"
                                  if event.reason == "cancelled" else f"finished with {event.reason!r}")
            raise GenerationError(why)
        text = slot.text.finish()
        slot.finish_reason = "stop" if slot.text.stopped else event.reason
        return Update(slot, text, [], done=True)
