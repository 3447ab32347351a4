"""Time one AdamW step: our three paths against torch's three, at GPT-sized parameter sets.

The parameters have the shapes of a GPT-2-style model (token and position embeddings,
per block the attention and MLP matrices with biases and two LayerNorms) and random
gradients. All optimizers update the same tensors; each keeps its own moments. The
contenders run interleaved, round by round, so a slow spell on a shared machine hits
them all alike; the script prints each one's median step time and its ratio to torch's
fused kernel. Our fused path compiles its kernel on its first step; that step is timed
apart and reported as the one-time compile cost.

    python -m benchmarks.bench_optim                  # from the repo root: ~16M and ~124M parameters
    python -m benchmarks.bench_optim --sizes 16m --rounds 5
    python -m benchmarks.bench_optim --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from gpt.optim import AdamW
from gpt.runtime import synchronize

# name: (vocab_size, context_length, d_model, n_layer)
SIZES = {
    "16m": (50304, 256, 256, 4),
    "124m": (50257, 1024, 768, 12),
}


def gpt_shapes(vocab_size: int, context_length: int, d_model: int, n_layer: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model with tied embeddings."""
    block = [
        (d_model,), (d_model,),                      # attention LayerNorm
        (3 * d_model, d_model), (3 * d_model,),      # q, k, v projection
        (d_model, d_model), (d_model,),              # attention output projection
        (d_model,), (d_model,),                      # MLP LayerNorm
        (4 * d_model, d_model), (4 * d_model,),      # MLP up
        (d_model, 4 * d_model), (d_model,),          # MLP down
    ]
    return [(vocab_size, d_model), (context_length, d_model)] + block * n_layer + [(d_model,), (d_model,)]


def make_params(shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    """Random parameters, each with a random gradient."""
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
        param.grad = torch.randn(shape, device=device) * 1e-3
        params.append(param)
    return params


def contenders(params: list[torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per implementation, all over the same parameters, weight decay on matrices only."""

    def groups() -> list[dict]:
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    settings = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    return {
        "ours loop": AdamW(groups(), **settings, foreach=False),
        "ours foreach": AdamW(groups(), **settings, foreach=True),
        "ours fused": AdamW(groups(), **settings, fused=True),
        "torch default": torch.optim.AdamW(groups(), **settings),
        "torch foreach": torch.optim.AdamW(groups(), **settings, foreach=True),
        "torch fused": torch.optim.AdamW(groups(), **settings, fused=True),
    }


def seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of `step()`, including the device's queued work."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def bench(size: str, rounds: int, device: torch.device) -> None:
    params = make_params(gpt_shapes(*SIZES[size]), device)
    n_params = sum(p.numel() for p in params)
    optimizers = contenders(params)
    # The first step allocates the moments (and compiles the fused kernel, in the first size run).
    first_steps = {name: seconds(optimizer.step, device) for name, optimizer in optimizers.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for round_index in range(rounds):
        shift = round_index % len(names)  # rotate the order so no one always runs first
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(optimizers[name].step, device))

    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{size} on {device}: {n_params / 1e6:.1f}M parameters, {len(params)} tensors, {rounds} rounds")
    print(f"first step of ours fused: {first_steps['ours fused']:.1f} s (compiling, unless an earlier size did)")
    print(f"{'optimizer':<15} {'median ms':>10} {'x fused':>8} {'x torch default':>16}")
    for name, median in medians.items():
        print(
            f"{name:<15} {median * 1e3:>10.1f} {median / medians['torch fused']:>8.2f}"
            f" {median / medians['torch default']:>16.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in args.sizes:
        bench(size, args.rounds, torch.device(args.device))


if __name__ == "__main__":
    main()
