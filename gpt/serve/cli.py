"""`python -m gpt serve --model M`: the model behind an OpenAI-compatible HTTP API and a chat page.

The server starts listening at once and loads the model in the background (`/health` is 503
until it is ready). A classifier checkpoint is served by `/v1/classify`, anything else
`--model` takes by the engine (continuous batching) behind `/v1/completions` and
`/v1/chat/completions`. SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in
flight finish (at most DRAIN_SECONDS), stops the engine and exits: 0 after SIGTERM, 130 after
Ctrl-C, as the other verbs.

FastAPI and uvicorn are the `serve` extra: without them the verb says `pip install -e ".[serve]"`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch

from .. import cli_args
from ..classifier import classifier_checkpoint, load_classifier
from ..cli import add_model_arguments, model_from_args
from ..errors import UserError
from ..quantize import parse_scheme, quantize_model
from ..runtime import pick_autocast_dtype, pick_device
from ..tokenizer import get_tokenizer
from .engine import Engine

if TYPE_CHECKING:
    from .app import ServedModel

DRAIN_SECONDS = 30.0  # how long requests in flight may take to finish after SIGTERM
DTYPES = ("float32", "bfloat16", "float16", "auto")


def require_serving_stack() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"python -m gpt serve needs {' and '.join(missing)}: pip install -e \".[serve]\"")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpt serve",
        description="Serve a model over HTTP in OpenAI's wire format (/v1/completions, /v1/chat/completions, "
                    "/v1/models; /v1/classify for classifier checkpoints) with a chat page at /.",
    )
    add_model_arguments(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="precision the engine computes in (autocast; auto = bfloat16 where the device has it); "
                             "float32 computes as python -m gpt generate does; classifiers run in float32 "
                             "(default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    parser.add_argument("--port", type=cli_args.port, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--api-key", type=cli_args.non_empty_text, default=os.environ.get("GPT_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on every /v1 request (default: $GPT_API_KEY, "
                             "else no key)")
    parser.add_argument("--max-batch", type=cli_args.positive_int, default=8,
                        help="requests decoded together (default: %(default)s)")
    parser.add_argument("--max-queue", type=cli_args.positive_int, default=64,
                        help="requests waiting for a slot; more are answered 429 (default: %(default)s)")
    parser.add_argument("--max-tokens-limit", type=cli_args.positive_int, default=None,
                        help="the largest max_tokens a request may ask for (default: the model's context length)")
    return parser


def load_served_model(args: argparse.Namespace) -> ServedModel:
    """What `--model` / `--checkpoint` / `--preset` names, ready to serve (a language model's engine started)."""
    from .app import Classifier, ServedModel  # FastAPI: imported once require_serving_stack has passed

    name = args.model or args.checkpoint or args.preset
    file = None if args.preset else classifier_checkpoint(name)
    if file is not None:
        model, info, tokenizer_name = load_classifier(file, pick_device(args.device, "--device"))
        if args.quantize:
            quantize_model(model.gpt, parse_scheme(args.quantize), include_head=False)
        return ServedModel(name, get_tokenizer(tokenizer_name), model.max_length,
                           classifier=Classifier(model, list(info["labels"]), info["pad_id"]))
    model, tokenizer = model_from_args(args)
    dtype = pick_autocast_dtype(args.dtype, model.tok_emb.weight.device)
    eos_ids = (tokenizer.eot_id,)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, eos_ids=eos_ids,
                    dtype=None if dtype == torch.float32 else dtype)
    engine.start()
    return ServedModel(name, tokenizer, engine.max_context, engine=engine, eos_ids=eos_ids)


def serve_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_serving_stack()
    pick_device(args.device, "--device")  # a device this machine lacks stops here, before the server starts
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s", stream=sys.stderr)
    app = create_app(api_key=args.api_key, max_tokens_limit=args.max_tokens_limit)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                           timeout_graceful_shutdown=int(DRAIN_SECONDS), log_level="info"))
    failures: list[BaseException] = []

    def load() -> None:
        start = time.perf_counter()
        try:
            served = load_served_model(args)
        except BaseException as err:  # the main thread reports it once the server has stopped
            failures.append(err)
            server.should_exit = True
            return
        app.state.served = served
        what = "classifier" if served.classifier is not None else f"max batch {args.max_batch}"
        logging.getLogger("gpt.serve").info(
            "serving %s (%s, context %d tokens), loaded in %.1f s: chat page at http://%s:%d/, API at /v1",
            served.name, what, served.context_length, time.perf_counter() - start, args.host, args.port)

    threading.Thread(target=load, name="load-model", daemon=True).start()
    # uvicorn drains on SIGTERM, then raises the signal again with the handler it found: this one, so the
    # process ends with 0 rather than being killed by the repeated signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        served = app.state.served
        if served is not None and served.engine is not None:
            served.engine.shutdown(drain_seconds=5.0)  # uvicorn has drained: only cancelled requests remain
    if failures:
        raise failures[0]
    return 0
