"""Serving throughput and latency: `python -m gpt serve` against itself at --max-batch 1 and against
`transformers serve --continuous-batching`, all driven by the same client.

For each server and each number of concurrent clients, every client sends `--requests-per-client`
streamed /v1/completions requests one after another (greedy, `--tokens` new tokens, a
different prompt per request) and records the time to its first token and to its last. Reported
per point: aggregate completion tokens/s over the whole point (tokens as the server's `usage`
counts them, or streamed chunks when it sends no usage), time to first token p50/p99 and request
latency p50/p99. Each server runs alone, in its own process, started and warmed up first.

    python -m benchmarks.serve --model tiny-checkpoint.pt --hf-folder tiny-hf/ --out results.json
    python -m benchmarks.serve --model smollm2-135m-instruct --hf-folder smollm2-hf/ --clients 1,8

`--model` is what `python -m gpt serve --model` takes; `--hf-folder` the same weights as a
Hugging Face folder (`python -m gpt convert`) for `transformers serve`; without it that server is
left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gpt.bench.cli import cpu_name

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "In the morning the teacher walked to the school and",
    "A recipe for bread: first, take",
    "The old man looked at the mountains and said",
    "Scientists have discovered that",
    "My favourite book is",
    "The train left the station at",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model: str, hf_folder: str | None, port: int, max_batch: int) -> subprocess.Popen:
    """A server process of `kind` ("ours", "transformers") on 127.0.0.1:port."""
    if kind == "ours":
        command = [sys.executable, "-m", "gpt", "serve", "--model", model, "--port", str(port),
                   "--max-batch", str(max_batch), "--max-queue", "256", "--device", "cpu"]
    else:
        beside_python = Path(sys.executable).parent / "transformers"  # the same environment's command
        command = [str(beside_python) if beside_python.exists() else shutil.which("transformers") or "transformers",
                   "serve", str(hf_folder), "--port", str(port),
                   "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


async def wait_ready(port: int, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server not ready in time")


async def one_request(client: httpx.AsyncClient, url: str, model_name: str, prompt: str, tokens: int) -> dict:
    """One streamed completion: seconds to the first token and to the end, completion tokens."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    chunks = usage_tokens = 0
    async with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens", 0)
            if any(choice.get("text") for choice in event.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - started
    return {"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - started,
            "tokens": usage_tokens or chunks}


async def run_point(port: int, model_name: str, clients: int, requests_per_client: int, tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def client_loop(index: int) -> list[dict]:
            return [await one_request(client, url, model_name, PROMPTS[(index + r) % len(PROMPTS)], tokens)
                    for r in range(requests_per_client)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client_loop(i) for i in range(clients))) for r in rs]
        seconds = time.perf_counter() - started
    ttft = sorted(r["ttft"] for r in results)
    latency = sorted(r["latency"] for r in results)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "seconds": seconds, "tokens_per_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99),
            "latency_p50": statistics.median(latency), "latency_p99": pct(latency, 0.99)}


async def bench_server(kind: str, label: str, args: argparse.Namespace, max_batch: int) -> list[dict]:
    port = free_port()
    process = start_server(kind, args.model, args.hf_folder, port, max_batch)
    try:
        await wait_ready(port, process)
        model_name = args.model if kind == "ours" else str(args.hf_folder)
        await run_point(port, model_name, 1, 1, 8)  # warm-up
        points = []
        for clients in args.clients:
            point = await run_point(port, model_name, clients, args.requests_per_client, args.tokens)
            point["server"] = label
            print(f"{label:>22} clients {clients:>2}: {point['tokens_per_s']:7.1f} tok/s, ttft p50 "
                  f"{point['ttft_p50']:.3f} s p99 {point['ttft_p99']:.3f} s, latency p50 {point['latency_p50']:.2f} s "
                  f"p99 {point['latency_p99']:.2f} s ({point['tokens']} tokens)", flush=True)
            points.append(point)
        return points
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="what `python -m gpt serve --model` takes")
    parser.add_argument("--hf-folder", default=None, help="the same weights as a Hugging Face folder, for transformers")
    parser.add_argument("--clients", default="1,4,8,16", help="comma list of concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each completion")
    parser.add_argument("--max-batch", type=int, default=8, help="our server's --max-batch (continuous batching)")
    parser.add_argument("--servers", default="ours,ours-batch1,transformers")
    parser.add_argument("--out", default="", help="also write the results as JSON")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",")
    points: list[dict] = []
    for server in servers:
        if server == "ours":
            points += asyncio.run(bench_server("ours", f"ours (max-batch {args.max_batch})", args, args.max_batch))
        elif server == "ours-batch1":
            points += asyncio.run(bench_server("ours", "ours (max-batch 1)", args, 1))
        elif server == "transformers" and args.hf_folder:
            try:
                points += asyncio.run(bench_server("transformers", "transformers serve --cb", args, 0))
            except Exception as err:  # recorded, not fatal: the comparison states why it is missing
                print(f"transformers serve failed: {err}", flush=True)
                points.append({"server": "transformers serve --cb", "error": str(err)[-2000:]})
    report = {"model": args.model, "hf_folder": args.hf_folder, "tokens": args.tokens,
              "requests_per_client": args.requests_per_client, "cpu": cpu_name(), "cores": os.cpu_count(),
              "command": "python -m benchmarks.serve " + " ".join(sys.argv[1:]), "points": points}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
