"""Activation checkpointing (`--train.activation_checkpointing`): peak memory and step time, with and without.

Each measurement runs alone in a freshly spawned process: build the model and AdamW, then train `--warmup`
steps and `--steps` timed steps (forward, backward, optimizer step) on one random batch, in float32 on the
CPU or under bf16 autocast on CUDA. Peak memory is counted as `python -m gpt bench` counts it
(gpt.bench.memory: torch's allocated peak on CUDA, the peak resident set on the CPU, over what the process
held before the model was built), so it includes weights, gradients and AdamW's moments as well as the
activations that checkpointing saves. The settings alternate for `--rounds` rounds, so a slow spell on a
shared machine hits both; the table gives each one's median step time and largest peak.

    python -m benchmarks.activation_checkpointing                               # GPT-2 124M, 4 x 1,024, CUDA
    python -m benchmarks.activation_checkpointing --device cpu --batch 1 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from gpt import GPT, ModelConfig
from gpt.bench.memory import in_fresh_process, memory_now, memory_peak, reset_memory_peak
from gpt.optim import AdamW, param_groups
from gpt.parallel import set_activation_checkpointing
from gpt.runtime import MiB, enable_tf32, synchronize


@dataclass(frozen=True)
class Trial:
    preset: str
    device: str
    batch: int
    context: int
    warmup: int
    steps: int
    checkpointing: bool


def measure(trial: Trial) -> dict[str, float]:
    """One setting in this (fresh) process: peak memory in MiB over the pre-model baseline, step times in s."""
    device = torch.device(trial.device)
    enable_tf32(device)
    torch.manual_seed(0)
    config = ModelConfig.preset(trial.preset, context_length=trial.context)
    ids = torch.randint(0, config.vocab_size, (trial.batch, trial.context + 1), device=device)  # (B, T + 1)
    gc.collect()
    baseline = memory_now(device)
    model = GPT(config).to(device)
    set_activation_checkpointing(model, trial.checkpointing)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    reset_memory_peak(device)
    seconds = []
    for step in range(trial.warmup + trial.steps):
        synchronize(device)
        started = time.perf_counter()
        with autocast:
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= trial.warmup:
            seconds.append(time.perf_counter() - started)
    return {"peak_memory_mib": (memory_peak(device) - baseline) / MiB, "step_seconds": statistics.median(seconds)}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--context", type=int, default=1024, help="tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each setting, alternating")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for checkpointing in (False, True):
            trial = Trial(args.preset, args.device, args.batch, args.context, args.warmup, args.steps, checkpointing)
            results[checkpointing].append(in_fresh_process(measure, trial))
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{args.preset}, batch {args.batch} x {args.context}, {args.device} ({machine}), "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, {args.rounds} rounds of {args.steps} steps")
    summary = {}
    for checkpointing, runs in results.items():
        peak = max(r["peak_memory_mib"] for r in runs)
        step = statistics.median(r["step_seconds"] for r in runs)
        summary["on" if checkpointing else "off"] = {"peak_memory_mib": round(peak), "step_seconds": round(step, 4)}
        print(f"activation checkpointing {'on ' if checkpointing else 'off'}: peak memory {peak:,.0f} MiB, "
              f"step {1000 * step:,.1f} ms")
    off, on = summary["off"], summary["on"]
    print(f"on/off: memory {on['peak_memory_mib'] / off['peak_memory_mib']:.2f}x, "
          f"step time {on['step_seconds'] / off['step_seconds']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "results": summary}, f, indent=1)


if __name__ == "__main__":
    main()
