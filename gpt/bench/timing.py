"""Timing: training steps in interleaved rounds, and greedy generation.

Every variant is warmed up first; then, round by round, each one runs the same number of
steps on the same batches, so a slow moment on a shared machine hits all of them alike.
Every timed span waits for the device before and after (`seconds`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..generate import generate
from ..runtime import synchronize
from .contenders import CONTENDERS, BenchConfig, Trainee, load_transformers_model, model_config, our_model
from .report import progress


def seconds(device: torch.device, work: Callable[[], object]) -> float:
    """Wall-clock seconds of `work`, waiting for the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" (weights stay fp32); nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_batches(
    count: int, batch_size: int, bench_config: BenchConfig, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random (x, y) pairs of shape (batch_size, context), y = x shifted by one token; the same for
    every contender."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, bench_config.context_length + 1)
    windows = [torch.randint(0, bench_config.vocab_size, shape, generator=generator) for _ in range(count)]
    return [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]


def train_step_function(
    trainee: Trainee, precision: str, mode: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One full training step on a batch (x, y); returns the loss (not synchronized)."""
    loss_of = trainee.loss(mode)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with precision_context(device, precision):
            loss = loss_of(x, y)
        loss.backward()
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ----------------------------------------------------------------------------
# Training speed
# ----------------------------------------------------------------------------


@dataclass
class TrainVariant:
    """One timed combination: a contender in a precision and mode."""

    contender: str
    precision: str
    mode: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    first_step_s: float = 0.0
    step_s_rounds: list[float] = field(default_factory=list)


def bench_training(
    trainees: dict[str, Trainee], batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace,
    device: torch.device,
) -> list[TrainVariant]:
    """Warm up every variant, then time them round by round, interleaved; returns the timings."""
    variants = [
        TrainVariant(name, precision, mode, train_step_function(trainee, precision, mode, device))
        for name, trainee in trainees.items()
        for precision in args.precisions
        for mode in args.modes
    ]
    for variant in variants:
        progress(f"  warming up {variant.contender} {variant.precision} {variant.mode}")
        variant.first_step_s = seconds(device, lambda: variant.step(*batches[0]))
        for i in range(1, args.warmup):
            variant.step(*batches[i % len(batches)])
    for round_index in range(args.rounds):
        progress(f"  round {round_index + 1}/{args.rounds}")
        for variant in variants:
            def run_steps() -> None:
                for i in range(args.steps):
                    variant.step(*batches[i % len(batches)])

            variant.step_s_rounds.append(seconds(device, run_steps) / args.steps)
    return variants


def initial_losses(
    trainees: dict[str, Trainee], batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Each contender's fp32 loss on the first batch before any step (a pair's losses should agree)."""
    with torch.no_grad():
        return {name: trainee.eager_loss(*batch).item() for name, trainee in trainees.items()}


# ----------------------------------------------------------------------------
# Generation speed
# ----------------------------------------------------------------------------


@dataclass
class GenerationRun:
    contender: str
    batch_size: int
    seconds_rounds: list[float] = field(default_factory=list)
    new_tokens: torch.Tensor | None = None  # (B, new) from the first timed round


def generation_function(model: nn.Module, library: str, new_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """prompt ids (B, P) -> exactly `new_tokens` greedy new tokens (B, new_tokens), through each library's API."""
    if library == "ours":
        return lambda ids: generate(model, ids, max_new_tokens=new_tokens, temperature=0.0)[:, ids.shape[1]:]

    def hf_generate(ids: torch.Tensor) -> torch.Tensor:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return out[:, ids.shape[1]:]

    return hf_generate


def bench_generation(
    bench_config: BenchConfig, names: Sequence[str], hf_folders: dict[str, Path], args: argparse.Namespace,
    device: torch.device,
) -> list[GenerationRun]:
    """Greedy generation, fp32, each pair from the same weights, interleaved round by round."""
    generators = {}
    for name in names:
        contender = CONTENDERS[name]
        if contender.library == "ours":
            model: nn.Module = our_model(model_config(bench_config, contender), args.seed)
        else:
            model = load_transformers_model(hf_folders[contender.family])
        generators[name] = generation_function(model.to(device).eval(), contender.library, args.new_tokens)
    prompt_generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = {
        b: torch.randint(0, bench_config.vocab_size, (b, args.prompt_length), generator=prompt_generator).to(device)
        for b in args.gen_batch_sizes
    }
    runs = [GenerationRun(name, b) for b in args.gen_batch_sizes for name in names]
    with torch.no_grad():
        for name, produce in generators.items():  # warm-up: one short generation each
            progress(f"  warming up generation: {name}")
            produce(prompts[args.gen_batch_sizes[0]][:1])
        for round_index in range(args.rounds):
            progress(f"  generation round {round_index + 1}/{args.rounds}")
            for run in runs:
                produce, prompt = generators[run.contender], prompts[run.batch_size]
                outputs: list[torch.Tensor] = []
                run.seconds_rounds.append(seconds(device, lambda: outputs.append(produce(prompt))))
                if run.new_tokens is None:
                    run.new_tokens = outputs[0].cpu()
    return runs
