"""The generation routes: POST /v1/completions and POST /v1/chat/completions.

Each request is parsed (`protocol.py`), its prompts turned into token ids and checked against
the context, and each choice submitted to the engine as a request of its own (`generation.py`).
The answer is one JSON object once every choice is done, or, with `stream`, server-sent events
as the text comes: OpenAI's chunks, then `data: [DONE]`. A client that goes away cancels its
engine requests, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import UserError
from ..prompts import chat_prompt
from ..tokenizer import Tokenizer
from . import protocol
from .engine import Engine
from .generation import ChoiceText, Generation, GenerationError, Slot
from .protocol import APIError, Sampling, TokenLogprob, invalid
from .request import QueueFull, SamplingParams

if TYPE_CHECKING:
    from .app import ServedModel

LOGGER = logging.getLogger("gpt.serve")
SSE_DONE = "data: [DONE]\n\n"
OnFinish = Callable[[str], None]  # notes the request's outcome in its log line


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def complete(request: Request, model: ServedModel, body: dict[str, Any], max_tokens_limit: int) -> Response:
    """/v1/completions: text (or token ids) in, text out; `echo` + `logprobs` score the prompt too."""
    engine = language_model(model)
    parsed = protocol.parse_completion_request(body, max_tokens_limit)
    tokenizer, sampling, n = model.tokenizer, parsed.sampling, parsed.sampling.n
    prompts = [prompt_ids(tokenizer, prompt) for prompt in parsed.prompts]
    for ids in prompts:
        check_context(model, len(ids), sampling.max_tokens, "prompt")
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in parsed.prompts]
    request_id, created = protocol.new_id("cmpl"), protocol.now()
    echoed: list[list[TokenLogprob]] = [[] for _ in prompts]  # the prompt's tokens, when echoed with logprobs
    if parsed.echo and parsed.logprobs is not None:
        echoed = [await asyncio.to_thread(scored_prompt, engine, tokenizer, ids, parsed.logprobs) for ids in prompts]
    slots = [Slot(p * n + j, ids, sampling_params(sampling, j, parsed.logprobs),
                  ChoiceText(tokenizer, sampling.stop, len(texts[p]) if parsed.echo else 0))
             for p, ids in enumerate(prompts) for j in range(n)]
    generation = start(model, engine, slots) if sampling.max_tokens else None  # max_tokens 0: the prompt alone
    finished = logger(request, request_id, sum(len(ids) for ids in prompts), slots, generation)

    def logprobs(tokens: list[TokenLogprob]) -> dict[str, list] | None:
        return None if parsed.logprobs is None else protocol.completion_logprobs(tokens, token_text(tokenizer))

    def usage() -> dict[str, int]:
        return protocol.usage(sum(len(ids) for ids in prompts), sum(s.completion_tokens for s in slots))

    if not sampling.stream:
        await finish_all(request, generation, finished)
        choices = [protocol.completion_choice(
            s.index, (texts[s.index // n] if parsed.echo else "") + s.text.text,
            logprobs(echoed[s.index // n] + s.logprobs), s.finish_reason or "length") for s in slots]
        return JSONResponse(protocol.completion_object(request_id, created, model.name, choices, usage()))

    def chunk(index: int, text: str, tokens: list[TokenLogprob], finish_reason: str | None) -> str:
        choice = protocol.completion_choice(index, text, logprobs(tokens), finish_reason)
        return sse(protocol.completion_object(request_id, created, model.name, [choice], None, chunk=True))

    async def events() -> AsyncIterator[str]:
        if parsed.echo:
            for slot in slots:
                yield chunk(slot.index, texts[slot.index // n], echoed[slot.index // n], None)
        if generation is None:
            for slot in slots:
                yield chunk(slot.index, "", [], "length")
        else:
            pending: dict[int, list[TokenLogprob]] = {slot.index: [] for slot in slots}  # tokens not sent yet
            async for update in generation.updates():
                index = update.slot.index
                pending[index] += update.tokens
                if update.text or update.done:
                    yield chunk(index, update.text, pending[index], update.slot.finish_reason if update.done else None)
                    pending[index] = []
        if sampling.include_usage:
            yield sse(protocol.completion_object(request_id, created, model.name, [], usage(), chunk=True))
        yield SSE_DONE

    return event_stream(events(), generation, finished)


async def chat(request: Request, model: ServedModel, body: dict[str, Any], max_tokens_limit: int) -> Response:
    """/v1/chat/completions: messages through the model's chat template, as `python -m gpt chat` formats them."""
    engine = language_model(model)
    parsed = protocol.parse_chat_request(body, max_tokens_limit)
    tokenizer, sampling = model.tokenizer, parsed.sampling
    try:
        text = chat_prompt(parsed.messages, tokenizer)
    except UserError as err:  # the template refuses this conversation (e.g. a system message it has no place for)
        raise invalid("messages", str(err)) from None
    ids = tokenizer.encode(text, allowed_special="all")
    if sampling.max_tokens is None:  # as long as the context allows (at least 1, so a full one is an error)
        sampling.max_tokens = max(1, min(max_tokens_limit, model.context_length - len(ids)))
    check_context(model, len(ids), sampling.max_tokens, "messages")
    request_id, created = protocol.new_id("chatcmpl"), protocol.now()
    slots = [Slot(j, ids, sampling_params(sampling, j, parsed.logprobs), ChoiceText(tokenizer, sampling.stop))
             for j in range(sampling.n)]
    generation = start(model, engine, slots)
    finished = logger(request, request_id, len(ids), slots, generation)

    def logprobs(tokens: list[TokenLogprob]) -> list[dict] | None:
        if parsed.logprobs is None:
            return None
        return protocol.chat_logprobs(tokens, token_text(tokenizer), lambda i: tokenizer.decode_bytes([i]))

    def usage() -> dict[str, int]:
        return protocol.usage(len(ids), sum(s.completion_tokens for s in slots))

    if not sampling.stream:
        await finish_all(request, generation, finished)
        choices = [protocol.chat_choice(s.index, s.text.text, logprobs(s.logprobs), s.finish_reason or "length")
                   for s in slots]
        return JSONResponse(protocol.chat_object(request_id, created, model.name, choices, usage()))

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        return sse(protocol.chat_chunk(request_id, created, model.name, choices, usage_, sampling.include_usage))

    async def events() -> AsyncIterator[str]:
        for slot in slots:
            yield chunk([protocol.chat_chunk_choice(slot.index, {"role": "assistant", "content": ""})])
        pending: dict[int, list[TokenLogprob]] = {slot.index: [] for slot in slots}  # tokens not sent yet
        async for update in generation.updates():
            index = update.slot.index
            pending[index] += update.tokens
            if update.text:
                yield chunk([protocol.chat_chunk_choice(index, {"content": update.text}, logprobs(pending[index]))])
                pending[index] = []
            if update.done:
                tokens = logprobs(pending[index]) if pending[index] else None
                yield chunk([protocol.chat_chunk_choice(index, {}, tokens, update.slot.finish_reason)])
        if sampling.include_usage:
            yield chunk([], usage())
        yield SSE_DONE

    return event_stream(events(), generation, finished)


# ----------------------------------------------------------------------------
# What both routes share
# ----------------------------------------------------------------------------


def language_model(model: ServedModel) -> Engine:
    if model.engine is None:
        raise APIError(400, f"{model.name} is a classifier: use POST /v1/classify", code="unsupported_model")
    return model.engine


def prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids; an empty text starts from the beginning-of-text token, as GPT-2's did."""
    if isinstance(prompt, list):
        bad = next((t for t in prompt if not 0 <= t < tokenizer.n_vocab), None)
        if bad is not None:
            raise invalid("prompt", f"token id {bad} is outside the vocabulary (0..{tokenizer.n_vocab - 1})")
        return prompt
    return tokenizer.encode(prompt) or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id]


def check_context(model: ServedModel, prompt_tokens: int, max_tokens: int, param: str) -> None:
    if prompt_tokens + max_tokens > model.context_length:
        raise invalid(param, f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                             f"{prompt_tokens + max_tokens} tokens exceeds the model's context of "
                             f"{model.context_length} tokens", code="context_length_exceeded")


def token_text(tokenizer: Tokenizer) -> Callable[[int], str]:
    return lambda token_id: tokenizer.decode([token_id])


def sampling_params(sampling: Sampling, choice: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, seed=sampling.seed_of(choice), logprobs=logprobs)


def scored_prompt(engine: Engine, tokenizer: Tokenizer, ids: list[int], top_k: int) -> list[TokenLogprob]:
    """The prompt's tokens with their logprobs given the tokens before them (null for the first) and the
    top_k alternatives, at their offsets in the prompt's text. Blocks until the engine has scored it."""
    decoder, offset, tokens = tokenizer.stream_decoder(), 0, []
    for token_id, (logprob, top) in zip(ids, engine.score(ids, top_k)):
        tokens.append(TokenLogprob(token_id, logprob, None if logprob is None else top, offset))
        offset += len(decoder.push(token_id))
    return tokens


def start(model: ServedModel, engine: Engine, slots: list[Slot]) -> Generation:
    """Queue the slots' requests; a full queue is a 429, a request the engine refuses a 400."""
    generation = Generation(engine, slots, model.eos_ids)
    try:
        generation.submit()
    except QueueFull:
        raise APIError(429, "the server is busy: its queue is full; retry shortly", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except ValueError as err:  # checked here first; the engine's own checks are the last word
        raise APIError(400, str(err)) from None
    return generation


def logger(request: Request, request_id: str, prompt_tokens: int, slots: list[Slot],
           generation: Generation | None) -> OnFinish:
    """Name the request in its log line; the function returned fills in the rest when it is over."""
    log = request.state.log
    log.request_id = request_id

    def finished(outcome: str) -> None:
        log.prompt_tokens, log.completion_tokens = prompt_tokens, sum(s.completion_tokens for s in slots)
        log.first_token_at = generation.first_token_at if generation else None
        log.outcome = log.outcome or outcome

    return finished


def finish_reasons(generation: Generation | None) -> str:
    return "finish=" + (",".join(s.finish_reason or "-" for s in generation.slots) if generation else "length")


async def finish_all(request: Request, generation: Generation | None, finished: OnFinish) -> None:
    """Run a generation to its end, unless the client disconnects first (then cancel it)."""
    if generation is None:
        finished(finish_reasons(None))
        return

    async def run() -> None:
        async for _ in generation.updates():
            pass

    try:
        completed = await unless_disconnected(request, run())
    except GenerationError as err:
        finished(f"engine error: {err}")
        raise APIError(500, f"generation failed: {err}", type="server_error") from None
    finally:
        generation.cancel()
    finished(finish_reasons(generation) if completed else "client disconnected")


async def unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Await `work`; if the client disconnects first, cancel it and return False."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()
    return True


def event_stream(events: AsyncIterator[str], generation: Generation | None, finished: OnFinish) -> StreamingResponse:
    """Server-sent events. When the client goes away, Starlette cancels the stream, and the engine requests
    with it. A failure after the stream began (the status line has gone out) is sent as an error event."""
    async def guarded() -> AsyncIterator[str]:
        outcome = "client disconnected"
        try:
            async for event in events:
                yield event
            outcome = finish_reasons(generation)
        except GenerationError as err:
            outcome = f"engine error: {err}"
            yield sse(protocol.error_body(f"generation failed: {err}", "server_error"))
        except Exception as err:
            outcome = f"error: {type(err).__name__}: {err}"
            LOGGER.exception("error while streaming")
            yield sse(protocol.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))
        finally:
            if generation is not None:
                generation.cancel()
            finished(outcome)

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
