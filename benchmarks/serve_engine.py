"""The serving engine alone (no HTTP): aggregate tokens/s of concurrent greedy requests.

    python -m benchmarks.serve_engine                        # tiny preset, fp32, 8 requests of 128 tokens
    python -m benchmarks.serve_engine --requests 1 --max-batch 1,8

Rows, each the best of `--rounds`:

    engine max_batch=B   `--requests` requests submitted at once to an `Engine(max_batch=B)`
    generate lockstep    `gpt.generate` on the same prompts as one batch: batched attention over
                         equal-length rows, no per-row work. Not batch invariant: the ceiling that
                         the engine's invariance (fixed step width, attention row by row) pays against.

The prompts are `--prompt-tokens` random token ids each (one seed), all of one length so the
lockstep batch needs no padding; every request runs its full `--tokens` (no eos).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from gpt.config import ModelConfig
from gpt.generate import generate
from gpt.model import GPT
from gpt.serve import Engine, Finished, SamplingParams


def run_engine(model: GPT, prompts: list[list[int]], tokens: int, max_batch: int) -> float:
    """Seconds for all prompts, submitted at once, to finish (the engine already warm)."""
    engine = Engine(model, max_batch=max_batch, max_queue=len(prompts))
    engine.start()
    engine.generate(prompts[0][:4], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    remaining = len(prompts)
    done = threading.Event()

    def on_event(event: object) -> None:
        nonlocal remaining
        if isinstance(event, Finished):
            remaining -= 1
            if remaining == 0:
                done.set()

    start = time.perf_counter()
    for prompt in prompts:
        engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0), on_event)
    done.wait()
    seconds = time.perf_counter() - start
    engine.shutdown()
    return seconds


def run_lockstep(model: GPT, prompts: list[list[int]], tokens: int) -> float:
    start = time.perf_counter()
    generate(model, prompts, tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-batch", default="1,8", help="comma-separated engine widths")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(args.preset)).eval()
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.prompt_tokens)).tolist()
    total = args.requests * args.tokens
    print(f"{args.preset}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"{args.requests} requests x {args.tokens} tokens")
    rows = [(f"engine max_batch={b}", lambda b=int(b): run_engine(model, prompts, args.tokens, b))
            for b in args.max_batch.split(",")]
    rows.append(("generate lockstep", lambda: run_lockstep(model, prompts, args.tokens)))
    for name, run in rows:
        seconds = min(run() for _ in range(args.rounds))
        print(f"{name:22s} {total / seconds:8.1f} tokens/s  ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
