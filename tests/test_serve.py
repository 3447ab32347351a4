"""`python -m gpt serve` as clients see it: real server processes on 127.0.0.1, driven by the official
`openai` client (httpx for the raw requests a well-behaved client never sends).

Two servers start once for the module, on two small random-init checkpoints: an open one, and one
with an API key, a one-slot engine and a long context (for the SIGTERM drain). Every expected text
comes from `gpt.generate` (or the `generate` verb) and every expected logprob from a plain forward
pass on the same weights, never from the server itself. The app-level tests at the end (a stub
engine, a classifier) use FastAPI's TestClient where no process is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from gpt.checkpoint import save_checkpoint
from gpt.classifier import GPTClassifier, classifier_info, classify_texts, load_classifier
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.generate import generate
from gpt.model import GPT
from gpt.prompts import chat_prompt
from gpt.serve import cli
from gpt.serve.app import Classifier, ServedModel, create_app
from gpt.serve.generation import ChoiceText
from gpt.serve.request import Finished, QueueFull
from gpt.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = get_tokenizer("gpt2")
PROMPTS = ["Once upon a time", "The capital of France is", "In the beginning", "Dear Sir,", "My favourite food",
           "The train left", "It was a dark and stormy night", "Hello", "A recipe for bread:", "Why is the sky",
           "The old man said", "Numbers: 1, 2, 3,", "She opened the door and", "import numpy as np", "Q: What is",
           "Once more, with feeling"]


def tiny_model(context_length: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=50257, context_length=context_length, d_model=32, n_layer=2, n_head=2)).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A `python -m gpt serve` process."""

    process: subprocess.Popen
    url: str
    name: str
    model: GPT
    log: Path

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(checkpoint: Path, model: GPT, log: Path, *flags: str) -> Server:
    port = free_port()
    with log.open("w") as out:  # the child writes to its own copy of the file
        process = subprocess.Popen([sys.executable, "-m", "gpt", "serve", "--checkpoint", str(checkpoint),
                                    "--port", str(port), *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return Server(process, f"http://127.0.0.1:{port}", str(checkpoint), model, log)


def wait_ready(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready within {timeout} s:\n{server.output()}")


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    folder = tmp_path_factory.mktemp("serve")
    open_model, keyed_model = tiny_model(128, seed=0), tiny_model(1024, seed=1)
    save_checkpoint(folder / "open.pt", open_model, tokenizer="gpt2")
    save_checkpoint(folder / "keyed.pt", keyed_model, tokenizer="gpt2")
    started = [start_server(folder / "open.pt", open_model, folder / "open.log"),
               start_server(folder / "keyed.pt", keyed_model, folder / "keyed.log", "--api-key", "sesame",
                            "--max-batch", "1", "--max-queue", "1")]  # a short queue, to fill
    try:
        for server in started:
            wait_ready(server)
        yield started[0], started[1]
    finally:
        for server in started:
            stop(server)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers) -> Server:
    return servers[1]


def greedy(model: GPT, ids: list[int], max_tokens: int) -> list[int]:
    """The new tokens of greedy decoding, up to and including an end-of-text token."""
    out = generate(model, [ids], max_tokens, temperature=0.0, eos_id=TOKENIZER.eot_id)[0][len(ids):]
    return out[:out.index(TOKENIZER.eot_id) + 1] if TOKENIZER.eot_id in out else out


def text_of(tokens: list[int]) -> str:
    return TOKENIZER.decode([t for t in tokens if t != TOKENIZER.eot_id])


def prompt_logprobs(model: GPT, ids: list[int]) -> list[float]:
    """log p(token i | tokens before it) for i >= 1, from one plain forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


# ----------------------------------------------------------------------------
# Text as it streams: whole characters, stop sequences held back
# ----------------------------------------------------------------------------


def pieces(text: str, stops: list[str], ids: list[int] | None = None) -> tuple[list[str], str, bool]:
    """What ChoiceText releases token by token (then at the end), its final text and whether it stopped."""
    choice = ChoiceText(TOKENIZER, stops)
    out = [choice.push(token) for token in (ids or TOKENIZER.encode(text))]
    return out + [choice.finish()], choice.text, choice.stopped


def test_streamed_text_never_splits_a_character():
    text = "日本語 🙂 naïve café"
    released, final, _ = pieces(text, [])
    assert "".join(released) == final == text
    assert all("\ufffd" not in piece for piece in released)
    assert released[:2] == ["", "日"]  # 日 is two tokens: nothing until its last byte has come


def test_stop_sequences_are_held_back_until_decided():
    released, final, stopped = pieces("abc END more", ["END"])
    assert (final, stopped) == ("abc ", True) and "".join(released) == "abc "
    e, n, d = TOKENIZER.encode("E")[0], TOKENIZER.encode("N")[0], TOKENIZER.encode("D")[0]
    x = TOKENIZER.encode("x")[0]
    assert pieces("", ["END"], [e, n, x])[0] == ["", "", "ENx", ""]  # "EN" might have begun "END"; "x" decides
    assert pieces("", ["END"], [e, n, d])[0] == ["", "", "", ""]
    assert pieces("", ["END"], [e, n])[:2] == (["", "", "EN"], "EN")  # the end of generation decides too
    assert pieces("one two three", ["two", "one two"])[1] == ""  # the earliest match wins


# ----------------------------------------------------------------------------
# Completions and chat
# ----------------------------------------------------------------------------


def test_health_models_and_page(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and {"active", "queued", "completed"} <= health.keys()
    assert [m.id for m in server.client().models.list().data] == [server.name]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "http://" not in page.text and "https://" not in page.text


def test_greedy_completion_equals_the_generate_verb(server):
    prompt = "The capital of France is"
    verb = subprocess.run([sys.executable, "-m", "gpt", "generate", "--checkpoint", server.name, "--prompt", prompt,
                           "--temperature", "0", "--max-new-tokens", "20"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert verb.returncode == 0, verb.stderr
    result = server.client().completions.create(model=server.name, prompt=prompt, max_tokens=20, temperature=0)
    assert verb.stdout == prompt + result.choices[0].text + "\n"
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    reference = greedy(server.model, TOKENIZER.encode(prompt), 20)
    assert result.usage.prompt_tokens == len(TOKENIZER.encode(prompt))
    assert result.usage.completion_tokens == len(reference)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.choices[0].finish_reason == ("stop" if TOKENIZER.eot_id in reference else "length")
    log_line = next(line for line in server.output().splitlines() if result.id in line)
    assert f"POST /v1/completions 200 prompt={len(TOKENIZER.encode(prompt))} completion={len(reference)} ttft=" in log_line
    assert "total=" in log_line


def test_prompt_list_and_streamed_completion(server):
    client = server.client()
    expected = [text_of(greedy(server.model, TOKENIZER.encode(p), 12)) for p in PROMPTS[:3]]
    result = client.completions.create(model=server.name, prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.text for c in result.choices] == expected
    assert result.usage.prompt_tokens == sum(len(TOKENIZER.encode(p)) for p in PROMPTS[:3])
    chunks = list(client.completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_plain_and_streamed(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    ids = TOKENIZER.encode(chat_prompt(messages, TOKENIZER), allowed_special="all")
    reference = greedy(server.model, ids, 16)
    result = client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == text_of(reference)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(reference))

    chunks = list(client.chat.completions.create(model=server.name, messages=messages, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(reference)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference)


def test_n_choices_with_a_seed(server):
    client = server.client()

    def sample(seed: int, n: int) -> list[str]:
        result = client.completions.create(model=server.name, prompt="Once", max_tokens=8, temperature=1.0,
                                           seed=seed, n=n)
        assert [c.index for c in result.choices] == list(range(n))
        assert result.usage.completion_tokens <= 8 * n
        return [c.text for c in result.choices]

    pair = sample(7, 2)
    assert sample(7, 2) == pair  # seeded: reproducible
    assert sample(8, 1) == pair[1:]  # choice i samples with seed + i
    chat = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_sequences_cut_the_text(server):
    client = server.client()
    prompt = PROMPTS[2]
    full = text_of(greedy(server.model, TOKENIZER.encode(prompt), 40))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    result = client.completions.create(model=server.name, prompt=prompt, max_tokens=40, temperature=0,
                                       stop=["never appears \x00", stop])
    assert (result.choices[0].text, result.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(model=server.name, prompt=prompt, max_tokens=40, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(server):
    prompt = PROMPTS[3]
    ids = TOKENIZER.encode(prompt)
    result = server.client().completions.create(model=server.name, prompt=prompt, max_tokens=6, temperature=0,
                                                logprobs=3)
    logprobs = result.choices[0].logprobs
    new = greedy(server.model, ids, 6)
    expected = prompt_logprobs(server.model, ids + new)[len(ids) - 1:]
    assert logprobs.tokens == [TOKENIZER.decode([t]) for t in new]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: the best one
    assert logprobs.text_offset == [len(TOKENIZER.decode(new[:i])) for i in range(len(new))]


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_scores_a_prompt_as_lm_evaluation_harness_reads_it(server, max_tokens, as_ids):
    """lm-evaluation-harness' local-completions: prompt = context + continuation, echo, logprobs=1,
    temperature 0; it sums token_logprobs over the continuation and checks each is the top alternative."""
    context, continuation = "The capital of France is", " Paris"
    context_ids, ids = TOKENIZER.encode(context), TOKENIZER.encode(context + continuation)
    body = {"model": server.name, "prompt": ids if as_ids else context + continuation, "echo": True,
            "max_tokens": max_tokens, "logprobs": 1, "temperature": 0, "seed": 1234}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(context + continuation)
    assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = prompt_logprobs(server.model, ids)
    assert logprobs["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
    end = len(ids)  # lm-eval slices [ctxlen:-1] when it asks for one token, [ctxlen:] for none
    scored = logprobs["token_logprobs"][len(context_ids):end]
    assert sum(scored) == pytest.approx(sum(expected[len(context_ids) - 1:]), abs=1e-4)
    for value, top in zip(scored, logprobs["top_logprobs"][len(context_ids):end]):
        assert len(top) == 1 and value <= max(top.values()) + 1e-6
    offsets = logprobs["text_offset"][:len(ids)]
    assert offsets == [len(TOKENIZER.decode(ids[:i])) for i in range(len(ids))]
    assert response.json()["usage"]["prompt_tokens"] == len(ids)


def test_chat_logprobs(server):
    result = server.client().chat.completions.create(model=server.name, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == result.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_sixteen_concurrent_streams_each_get_their_own_text(server):
    expected = [text_of(greedy(server.model, TOKENIZER.encode(p), 24)) for p in PROMPTS]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model=server.name, prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def everyone() -> list[str]:
        async with client:
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(everyone()) == expected


def test_a_client_that_disconnects_does_not_stall_the_others(server):
    expected = [text_of(greedy(server.model, TOKENIZER.encode(p), 24)) for p in PROMPTS[:4]]
    results: list[str | None] = [None] * 4

    def others(i: int) -> None:
        result = server.client().completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=24,
                                                     temperature=0)
        results[i] = result.choices[0].text

    threads = [threading.Thread(target=others, args=(i,)) for i in range(4)]
    body = {"model": server.name, "prompt": PROMPTS[5], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        for thread in threads:
            thread.start()
    # Leaving the block closed the connection mid-stream.
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected
    deadline = time.monotonic() + 10
    while (stats := httpx.get(server.url + "/health").json())["active"] + stats["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats["active"] == stats["queued"] == 0  # the abandoned request was cancelled, not left running


# ----------------------------------------------------------------------------
# Bad requests: status and OpenAI's error object
# ----------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}

BAD_REQUESTS = [  # (route, body, status, param, words in the message)
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", ["at least 0", "-1"]),
    ("completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens", ["at most 128", "1000000"]),
    ("completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", ["integer", '"ten"']),
    ("completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens", ["integer"]),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ["between 0 and 2", "-0.5"]),
    ("completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature", ["2.5"]),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", ["(0, 1]"]),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", ["1.5"]),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", ["at least 1"]),
    ("completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", ["at most 5"]),
    ("completions", {"prompt": "x", "stop": 3}, 400, "stop", ["string"]),
    ("completions", {"prompt": 5}, 400, "prompt", ["string"]),
    ("completions", {"prompt": [60000]}, 400, "prompt", ["60000", "vocabulary"]),
    ("completions", {"max_tokens": 3}, 400, "prompt", ["required"]),
    ("completions", {"prompt": "word " * 100, "max_tokens": 100}, 400, "prompt", ["max_tokens (100)", "128 tokens"]),
    ("completions", {"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", ["not supported"]),
    ("chat/completions", {"messages": []}, 400, "messages", ["non-empty"]),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", ["wizard"]),
    ("chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content", ["string"]),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", ["at least 1"]),
    ("chat/completions", {**CHAT, "max_completion_tokens": 200}, 400, "max_completion_tokens", ["at most 128"]),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", ["logprobs"]),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 130}]}, 400, "messages", ["128"]),
    ("chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", ["gpt-4"]),
    ("classify", {"input": "hello"}, 400, None, ["not a classifier"]),
]


def check_error(response: httpx.Response, status: int, param: str | None = None, words: list[str] = ()) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


@pytest.mark.parametrize("route, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{r}-{'-'.join(b)}" for r, b, *_ in BAD_REQUESTS])
def test_bad_values_get_their_status_and_error_object(server, route, body, status, param, words):
    check_error(httpx.post(f"{server.url}/v1/{route}", json=body, timeout=30), status, param, words)


def test_malformed_bodies_unknown_routes_and_huge_bodies(server):
    post = lambda data, **kw: httpx.post(server.url + "/v1/completions", content=data, timeout=30,  # noqa: E731
                                         headers={"Content-Type": "application/json"}, **kw)
    check_error(post(b'{"prompt": "x", '), 400, words=["not valid JSON"])
    check_error(post(b'["a list"]'), 400, words=["JSON object"])
    check_error(post(b'\xff\xfe'), 400, words=["not valid JSON"])
    check_error(post(json.dumps({"prompt": "x" * (2**20)}).encode()), 413, words=["exceeds"])
    check_error(httpx.get(server.url + "/v1/nothing-here"), 404, words=["/v1/nothing-here"])
    check_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, "model")
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


# ----------------------------------------------------------------------------
# The keyed server: authentication, a full queue, then SIGTERM (which ends it: it comes last)
# ----------------------------------------------------------------------------


def test_api_key_is_required_on_v1_routes_only(keyed, server):
    check_error(httpx.get(keyed.url + "/v1/models"), 401)
    check_error(httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    check_error(httpx.post(keyed.url + "/v1/completions", json={"prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert httpx.get(keyed.url + "/health").status_code == 200 and httpx.get(keyed.url + "/").status_code == 200
    result = keyed.client("sesame").completions.create(model=keyed.name, prompt="Hi", max_tokens=3, temperature=0)
    assert result.choices[0].text == text_of(greedy(keyed.model, TOKENIZER.encode("Hi"), 3))
    assert server.client("any key at all").models.list().data  # a server without a key takes any


def test_a_full_queue_answers_429_with_retry_after(keyed):
    client = keyed.client("sesame")
    body = {"model": keyed.name, "prompt": "Once", "max_tokens": 900, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer sesame"}
    client.models.list()  # the client is warm: the next requests go out at once
    with httpx.stream("POST", keyed.url + "/v1/completions", json=body, headers=headers, timeout=60) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")  # decoding, in the one slot
        with httpx.stream("POST", keyed.url + "/v1/completions", json=body, headers=headers, timeout=60) as queued:
            assert queued.status_code == 200  # waiting in the one-place queue
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model=keyed.name, prompt="Hi", max_tokens=3)
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "queue_full"


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(keyed):
    ids = TOKENIZER.encode("Once upon a time")
    expected = text_of(greedy(keyed.model, ids, 600))
    body = {"model": keyed.name, "prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "stream": True}
    with httpx.stream("POST", keyed.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer sesame"}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        keyed.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert keyed.process.wait(timeout=60) == 0, keyed.output()
    assert "Waiting for connections to close" in keyed.output()  # the request was still in flight


# ----------------------------------------------------------------------------
# App-level: engine failures, classifiers, the command line
# ----------------------------------------------------------------------------


class StubEngine:
    """An engine that refuses (a full queue), crashes in submit, or fails each request."""

    stats = {"active": 0, "queued": 0, "completed": 0}

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def submit(self, prompt_ids, params, on_event):
        if self.behaviour == "full":
            raise QueueFull()
        if self.behaviour == "crash":
            raise RuntimeError("the stub crashed")
        on_event(Finished("error", len(prompt_ids), 0, error="the stub failed"))
        return SimpleNamespace(request_id="stub", cancel=lambda: None)


def stub_client(behaviour: str) -> TestClient:
    served = ServedModel("stub", TOKENIZER, 128, engine=StubEngine(behaviour), eos_ids=(TOKENIZER.eot_id,))
    return TestClient(create_app(served), raise_server_exceptions=False)


@pytest.mark.parametrize("behaviour, status, words", [("full", 429, ["queue is full"]),
                                                      ("crash", 500, ["the stub crashed"]),
                                                      ("fail", 500, ["the stub failed"])])
def test_engine_refusals_and_failures_fail_only_that_request(behaviour, status, words):
    client = stub_client(behaviour)
    check_error(client.post("/v1/completions", json={"prompt": "Hi"}), status, words=words)
    check_error(client.post("/v1/chat/completions", json=CHAT), status, words=words)
    assert client.get("/health").status_code == 200


def test_an_engine_failure_mid_stream_is_an_error_event():
    response = stub_client("fail").post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["error"]["message"] == "generation failed: the stub failed"


def test_not_ready_is_503_and_auth_checks_the_key():
    client = TestClient(create_app(None, api_key="k"))
    assert client.get("/health").status_code == 503
    check_error(client.get("/v1/models"), 401)
    check_error(client.get("/v1/models", headers={"Authorization": "Bearer k"}), 503, words=["loading"])


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    model = GPTClassifier(tiny_model(64, seed=2), num_classes=2, max_length=32)
    save_checkpoint(path, model, tokenizer="gpt2", classifier=classifier_info(["ham", "spam"], "last", 32,
                                                                               TOKENIZER.eot_id))
    return path


def test_classify_route_for_a_classifier_checkpoint(classifier_checkpoint, tmp_path):
    assert cli.classifier_checkpoint(str(classifier_checkpoint)) == classifier_checkpoint  # served by /v1/classify
    save_checkpoint(tmp_path / "lm.pt", tiny_model(64, seed=3), tokenizer="gpt2")
    assert cli.classifier_checkpoint(str(tmp_path / "lm.pt")) is None  # served by the engine
    assert cli.classifier_checkpoint(str(tmp_path / "missing.pt")) is None
    model, info, _ = load_classifier(classifier_checkpoint)
    served = ServedModel("clf", TOKENIZER, 32, classifier=Classifier(model, info["labels"], info["pad_id"]))
    client = TestClient(create_app(served))
    texts = ["WINNER!! Claim your prize", "see you at lunch"]
    body = client.post("/v1/classify", json={"input": texts}).json()
    expected = classify_texts(model, TOKENIZER, texts, info["pad_id"])
    assert [d["label"] for d in body["data"]] == [info["labels"][row.argmax()] for row in expected]
    assert [p for d in body["data"] for p in d["probabilities"].values()] == pytest.approx(expected.ravel(), abs=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(TOKENIZER.encode(t)) for t in texts)
    check_error(client.post("/v1/classify", json={"input": ["ok", ""]}), 400, "input[1]", ["empty"])
    check_error(client.post("/v1/completions", json={"prompt": "x"}), 400, words=["classifier", "/v1/classify"])


def test_command_line_needs_the_extra_and_a_real_key(monkeypatch, capsys):
    """(The other flags' bad values are in tests/test_bad_inputs.py.)"""
    with pytest.raises(SystemExit) as exit_:
        cli.serve_cli(["--preset", "tiny", "--api-key", ""])
    assert exit_.value.code == 2 and "argument --api-key: must not be empty" in capsys.readouterr().err
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r'needs fastapi and uvicorn: pip install -e "\.\[serve\]"'):
        cli.serve_cli(["--preset", "tiny"])
