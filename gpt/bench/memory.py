"""Peak training memory: each variant rebuilt and trained alone in a freshly spawned process.

On CUDA the peak is `torch.cuda.max_memory_allocated` during the steps; on CPU the peak
resident set (VmHWM, reset once the model is built). Either is reported over what the
process held before the model was built. The package docstring says what each includes.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime import MiB, enable_tf32, synchronize
from .contenders import CONTENDERS, BenchConfig, build_trainee, quiet_transformers
from .report import progress
from .timing import token_batches, train_step_function


@dataclass(frozen=True)
class MemoryProbe:
    """Everything a fresh process needs to rebuild one variant and train it for a few steps."""

    bench_config: BenchConfig
    contender: str
    precision: str
    mode: str
    device: str
    batch_size: int
    steps: int
    seed: int
    threads: int
    hf_folders: dict[str, str]


def _proc_status_kib(key: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_now(device: torch.device) -> int:
    """Bytes in use now: allocated by torch on CUDA, the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def reset_memory_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS


def memory_peak(device: torch.device) -> int:
    """Bytes at the peak since the last `reset_memory_peak`, counted as `memory_now` counts."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def memory_method(device: torch.device) -> str:
    """How the peak is measured on `device`, for the report's metadata."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the steps minus allocated before the model, fresh process"
    return "peak RSS (VmHWM, reset after building) minus RSS before building the model, fresh process"


def memory_supported(device: torch.device) -> bool:
    return device.type == "cuda" or (Path("/proc/self/status").exists() and Path("/proc/self/clear_refs").exists())


def run_memory_probe(probe: MemoryProbe) -> dict[str, float]:
    """Build one variant in this (fresh) process, train warm-up + 1 steps; report MiB over the pre-model baseline."""
    import transformers

    quiet_transformers()
    _ = transformers.GPT2LMHeadModel, transformers.LlamaForCausalLM  # import the model code before the baseline
    torch.set_num_threads(probe.threads)
    device = torch.device(probe.device)
    enable_tf32(device)
    bench_config = probe.bench_config
    batches = token_batches(1, probe.batch_size, bench_config, probe.seed, device)
    gc.collect()
    baseline = memory_now(device)
    hf_folders = {family: Path(path) for family, path in probe.hf_folders.items()}
    trainee = build_trainee(CONTENDERS[probe.contender], bench_config, probe.seed, hf_folders, device)
    gc.collect()
    built = memory_now(device)
    reset_memory_peak(device)
    step = train_step_function(trainee, probe.precision, probe.mode, device)
    for _ in range(probe.steps):
        step(*batches[0])
    synchronize(device)
    return {"peak_memory_mib": (memory_peak(device) - baseline) / MiB, "built_memory_mib": (built - baseline) / MiB}


def in_fresh_process(function: Callable[[Any], Any], argument: Any) -> Any:
    """Run `function(argument)` in a newly spawned Python process and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, argument).result()


def add_memory(
    rows: list[dict[str, Any]],
    bench_config: BenchConfig,
    args: argparse.Namespace,
    device: torch.device,
    batch_size: int,
    hf_folders: dict[str, Path],
) -> list[dict[str, Any]]:
    """Peak memory of each variant, each measured alone in a fresh process; merged into the train rows."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand this process's cached blocks back, so the probes have the device's memory
    by_key = {(row["contender"], row["precision"], row["mode"]): row for row in rows}
    for name in args.contenders:
        for precision in args.precisions:
            for mode in args.modes:
                progress(f"  memory: {name} {precision} {mode} (fresh process)")
                probe = MemoryProbe(
                    bench_config=bench_config,
                    contender=name,
                    precision=precision,
                    mode=mode,
                    device=str(device),
                    batch_size=batch_size,
                    steps=args.warmup + 1,
                    seed=args.seed,
                    threads=torch.get_num_threads(),
                    hf_folders={family: str(path) for family, path in hf_folders.items()},
                )
                row = by_key.setdefault((name, precision, mode), dict(contender=name, precision=precision, mode=mode))
                row.update(in_fresh_process(run_memory_probe, probe))
    return list(by_key.values())
