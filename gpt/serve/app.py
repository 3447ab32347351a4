"""The HTTP server of `python -m gpt serve`: a FastAPI app in OpenAI's wire format.

    GET  /                      the chat page (static/index.html)
    GET  /health                503 while the model loads, then 200 with the engine's stats
    GET  /v1/models             the one model served
    POST /v1/completions        text in, text out (echo + logprobs score a prompt, as lm-evaluation-harness asks)
    POST /v1/chat/completions   messages through the model's chat template
    POST /v1/classify           our extension, for classifier checkpoints: labels and probabilities

Bodies are read and parsed here, not by FastAPI (`protocol.py` checks the fields;
`completions.py` serves the two generation routes), so a bad request is always OpenAI's
error object: 400 for a bad value, malformed JSON or a wrong type, 401 for a missing or
wrong API key (every /v1 route, when the server has one), 404 for an unknown model or route,
413 for a body over the limit, 429 with Retry-After when the engine's queue is full, 500
when serving one request failed; the server goes on serving. Each request is logged on one
line when its response is done (`Gate`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..classifier import GPTClassifier, classify_texts
from ..tokenizer import Tokenizer
from . import protocol
from .completions import chat, complete
from .engine import Engine
from .protocol import APIError

MiB = 2**20
LOGGER = logging.getLogger("gpt.serve")


@dataclass
class Classifier:
    """A classifier checkpoint, served by /v1/classify."""

    model: GPTClassifier
    labels: list[str]
    pad_id: int


@dataclass
class ServedModel:
    """What the server serves: a language model behind an engine, or a classifier."""

    name: str  # what clients put in "model"
    tokenizer: Tokenizer
    context_length: int  # prompt + max_tokens fit in it (the engine's max_context)
    engine: Engine | None = None
    eos_ids: tuple[int, ...] = ()
    classifier: Classifier | None = None


@dataclass
class RequestLog:
    """The fields of a request's log line; handlers fill them in, the middleware writes the line."""

    method: str
    path: str
    started: float
    request_id: str = "-"
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    outcome: str = ""  # finish reasons, "client disconnected", an error

    def line(self) -> str:
        now = time.perf_counter()
        tokens = (f" prompt={self.prompt_tokens} completion={self.completion_tokens}"
                  if self.prompt_tokens is not None else "")
        ttft = f" ttft={self.first_token_at - self.started:.3f}s" if self.first_token_at else ""
        return (f"{self.request_id} {self.method} {self.path} {self.status or '-'}{tokens}{ttft} "
                f"total={now - self.started:.3f}s {self.outcome}").rstrip()


class Gate:
    """ASGI middleware: the API key for /v1 routes, and one log line per request when its response is done."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        log = RequestLog(scope["method"], scope["path"], time.perf_counter())
        scope.setdefault("state", {})["log"] = log

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                log.status = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1") and not self._authorized(scope):
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception as err:
            log.status, log.outcome = log.status or 500, f"error: {type(err).__name__}: {err}"
            raise
        finally:
            LOGGER.info(log.line())

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.api_key.encode())


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(served: ServedModel | None = None, *, api_key: str | None = None, max_tokens_limit: int | None = None,
               max_body_bytes: int = MiB) -> FastAPI:
    """The app. `served` may be set later (`app.state.served = ...`, once the model has loaded): until then
    /health and /v1 answer 503. `max_tokens_limit` caps `max_tokens` (default: the model's context length)."""
    app = FastAPI(title="gpt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(Gate, api_key=api_key)
    page = (resources.files("gpt.serve") / "static" / "index.html").read_text(encoding="utf-8")
    classify_lock = threading.Lock()  # one classification at a time: each uses all the CPU threads

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        request.state.log.outcome = error.message
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}",
                    405: f"{request.url.path} does not take {request.method} requests"}
        return error_response(APIError(error.status_code, messages.get(error.status_code, str(error.detail)),
                                       code="not_found" if error.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        LOGGER.exception("error while serving %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    def ready() -> ServedModel:
        if app.state.served is None:
            raise APIError(503, "the model is still loading; try again shortly", type="server_error",
                           headers={"Retry-After": "5"})
        return app.state.served

    async def read_body(request: Request, model: ServedModel) -> dict[str, Any]:
        """The JSON object of the request; the size is checked before anything is parsed."""
        too_large = APIError(413, f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        name = body.get("model")
        if name is not None and name != model.name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model.name!r}",
                           param="model", code="model_not_found")
        return body

    created_at = protocol.now()

    def model_card(model: ServedModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": created_at, "owned_by": "gpt"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        model = app.state.served
        if model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        stats = model.engine.stats if model.engine is not None else {}
        return JSONResponse({"status": "ok", "model": model.name, **stats})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(ready())]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict[str, Any]:
        model = ready()
        if name != model.name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model.name!r}",
                           param="model", code="model_not_found")
        return model_card(model)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        model = ready()
        body = await read_body(request, model)
        return await complete(request, model, body, max_tokens_limit or model.context_length)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        model = ready()
        body = await read_body(request, model)
        return await chat(request, model, body, max_tokens_limit or model.context_length)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        model = ready()
        body = await read_body(request, model)
        if model.classifier is None:
            raise APIError(400, f"{model.name} is a language model, not a classifier: /v1/classify serves "
                                "classifier checkpoints (finetune_classifier.py)", code="unsupported_model")
        texts = protocol.parse_classify_request(body)
        classifier = model.classifier
        request.state.log.request_id = request_id = protocol.new_id("clf")

        def run() -> Any:
            with classify_lock:
                return classify_texts(classifier.model, model.tokenizer, texts, classifier.pad_id)

        probabilities = await asyncio.to_thread(run)
        tokens = sum(min(len(ids), classifier.model.max_length) for ids in model.tokenizer.encode_batch(texts))
        request.state.log.prompt_tokens, request.state.log.completion_tokens = tokens, 0
        data = [{"index": i, "label": classifier.labels[int(row.argmax())],
                 "probabilities": {label: float(p) for label, p in zip(classifier.labels, row)}}
                for i, row in enumerate(probabilities)]
        return JSONResponse({"id": request_id, "object": "classification", "created": protocol.now(),
                             "model": model.name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return app
