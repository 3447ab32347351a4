"""OpenAI's wire format for `python -m gpt serve`: request bodies in, response objects out.

Requests are parsed by hand from the decoded JSON, not by a framework, so that every bad
value is a 400 with OpenAI's error object naming the field and the value:

    {"error": {"message": "temperature: must be between 0 and 2, got 3.5", "type": "invalid_request_error",
               "param": "temperature", "code": null}}

`parse_completion_request` and `parse_chat_request` check each field on its own (types,
ranges, the `--max-tokens-limit`); what needs the tokenizer (the prompt fits the context)
is checked by the app. Fields this server does not use are ignored, except those whose
effect a client would silently miss (`logit_bias`, `tools`, penalties, ...): those are a 400.

The builders at the bottom write the response objects: `text_completion`,
`chat.completion`, `chat.completion.chunk`, `usage`, and the two logprobs layouts
(completions' `tokens`/`token_logprobs`/`top_logprobs`/`text_offset` lists, chat's
`logprobs.content` entries).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import SEED_LIMIT
from ..prompts import ROLES

MAX_N = 16  # choices per request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions `top_logprobs`

# Fields whose effect this server does not implement: a value other than the neutral one is a 400.
UNSUPPORTED = {
    "suffix": None, "logit_bias": None, "tools": None, "functions": None, "tool_choice": None,
    "response_format": None, "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1,
}


class APIError(Exception):
    """A request that fails with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 about one field: the message starts with the field's name."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


# ----------------------------------------------------------------------------
# Reading fields
# ----------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A value as the client wrote it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def get_int(body: dict, name: str, default: int | None, minimum: int | None = None, maximum: int | None = None,
            maximum_note: str = "") -> int | None:
    """An integer field (null or absent -> `default`) within [minimum, maximum]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"expected an integer, got {_json_type(value)} ({_shown(value)})")
    if minimum is not None and value < minimum:
        raise invalid(name, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise invalid(name, f"must be at most {maximum}{maximum_note}, got {value}")
    return value


def get_float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """A finite number field (null or absent -> `default`) in [low, high], or (low, high] with `low_open`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(name, f"expected a number, got {_json_type(value)} ({_shown(value)})")
    if value > high or value < low or (low_open and value == low):
        interval = f"in ({low:g}, {high:g}]" if low_open else f"between {low:g} and {high:g}"
        raise invalid(name, f"must be {interval}, got {value}")
    return float(value)


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {_json_type(value)} ({_shown(value)})")
    return value


def reject_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != neutral and value not in ({}, [], ""):
            raise invalid(name, f"not supported by this server (got {_shown(value)})", code="unsupported_parameter")


# ----------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------


@dataclass
class Sampling:
    """The fields completions and chat share. `max_tokens` None: as many as the context leaves."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int | None
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    def seed_of(self, choice: int) -> int | None:
        """Choice i samples with seed + i, so n choices differ and each is reproducible."""
        return None if self.seed is None else (self.seed + choice) % SEED_LIMIT


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text, or token ids (what lm-evaluation-harness sends)
    sampling: Sampling
    echo: bool
    logprobs: int | None


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling
    logprobs: int | None  # top alternatives per token; None: no logprobs


def _parse_sampling(body: dict, max_tokens_name: str, default_max_tokens: int | None, min_max_tokens: int,
                    max_tokens_limit: int) -> Sampling:
    reject_unsupported(body)
    max_tokens = get_int(body, max_tokens_name, default_max_tokens, min_max_tokens, max_tokens_limit,
                         " (the server's --max-tokens-limit)")
    top_k = get_int(body, "top_k", None, -1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop", f"expected a string or an array of strings, got {_shown(stop)}")
    if "" in stop:
        raise invalid("stop", "a stop sequence must not be empty")
    stream = get_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict):
            raise invalid("stream_options", f"expected an object, got {_shown(options)}")
    return Sampling(
        max_tokens=max_tokens,
        temperature=get_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=get_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=top_k if top_k and top_k > 0 else None,  # 0 and -1 (vLLM's spelling): no limit
        seed=get_int(body, "seed", None, 0, SEED_LIMIT - 1),
        n=get_int(body, "n", 1, 1, MAX_N),
        stop=tuple(stop),
        stream=stream,
        include_usage=get_bool(options or {}, "include_usage", False),
    )


def _parse_prompts(value: Any) -> list[str | list[int]]:
    """`prompt`: a string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [value]
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
               for item in value):
            return list(value)
    raise invalid("prompt", "expected a string, an array of strings, or token ids (an array of integers or of "
                            f"arrays of integers), got {_shown(value)}")


def parse_completion_request(body: dict, max_tokens_limit: int) -> CompletionRequest:
    """A /v1/completions body; max_tokens defaults to 16 (as OpenAI's) and may be 0 (score the prompt only)."""
    if "prompt" not in body:
        raise invalid("prompt", "required")
    return CompletionRequest(
        prompts=_parse_prompts(body["prompt"]),
        sampling=_parse_sampling(body, "max_tokens", min(16, max_tokens_limit), 0, max_tokens_limit),
        echo=get_bool(body, "echo", False),
        logprobs=get_int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS),
    )


def _message_content(index: int, content: Any, role: str) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts (null for an assistant)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(part["text"] for part in content)
    raise invalid(f"messages[{index}].content", "expected a string or an array of text parts "
                                                f"({{\"type\": \"text\", \"text\": ...}}), got {_shown(content)}")


def parse_chat_request(body: dict, max_tokens_limit: int) -> ChatRequest:
    """A /v1/chat/completions body: `max_completion_tokens` wins over `max_tokens`; absent, the reply may fill
    the context (up to the limit)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", f"expected a non-empty array of messages, got {_shown(messages)}")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}]", f"expected an object with 'role' and 'content', got {_shown(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{index}].role", f"expected one of {', '.join(ROLES)}, got {_shown(role)}")
        parsed.append({"role": role, "content": _message_content(index, message.get("content"), role)})
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _parse_sampling(body, name, None, 1, max_tokens_limit)
    top_logprobs = get_int(body, "top_logprobs", None, 0, MAX_CHAT_TOP_LOGPROBS)
    wants_logprobs = get_bool(body, "logprobs", False)
    if top_logprobs is not None and not wants_logprobs:
        raise invalid("top_logprobs", "needs logprobs set to true")
    return ChatRequest(parsed, sampling, (top_logprobs or 0) if wants_logprobs else None)


def parse_classify_request(body: dict) -> list[str]:
    """/v1/classify (our extension): `input`, a non-empty string or an array of them."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid("input", f"expected a string or an array of strings, got {_shown(value)}")
    for index, text in enumerate(texts):
        if not text.strip():
            raise invalid("input" if isinstance(value, str) else f"input[{index}]", "must not be empty")
    return texts


# ----------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An id like OpenAI's: `cmpl-`, `chatcmpl-` or `clf-` and 24 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
                      chunk: bool = False) -> dict[str, Any]:
    """A `text_completion` (streamed chunks have the same object name, with `usage` only on the last)."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if not chunk or usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_object(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def chat_choice(index: int, text: str, logprobs: list[dict] | None, finish_reason: str) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `include_usage` every chunk has a `usage` field (null but on the last)."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if include_usage:
        body["usage"] = usage_
    return body


def chat_chunk_choice(index: int, delta: dict[str, Any], logprobs: list[dict] | None = None,
                      finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


# ----------------------------------------------------------------------------
# Logprobs
# ----------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """One token with its log-probability and the most likely alternatives at its position; `offset` is where
    its text starts in the choice's text (the `text_offset` of completions)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    offset: int


def completion_logprobs(tokens: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, list]:
    """The /v1/completions layout: parallel lists; the first prompt token has null logprob and alternatives."""
    return {
        "tokens": [token_text(t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.top is None else {token_text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def chat_logprobs(tokens: list[TokenLogprob], token_text: Callable[[int], str],
                  token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """The /v1/chat/completions `logprobs.content` entries: token, logprob, bytes, top_logprobs."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

    return [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
            for t in tokens]
