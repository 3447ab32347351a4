"""Where and how a run executes: device, precision, processes, seeds, and what the machine can do.

A training script opens a `Runtime` before it builds any data or model, and closes it
when it is done:

    with setup_runtime(cfg, "pretrain") as runtime:
        ...                       # data for runtime.rank / runtime.world_size, model, train()

`setup_runtime` picks the device and the autocast precision, joins the process group
under `torchrun` (FSDP in a single process gets a process group of one), claims the run folder (gpt.run_folder: created, locked, checked),
switches on TF32 (CUDA) or glibc's keeping of freed memory (CPU), and seeds every random
number generator. Leaving the `with` block leaves the process group (if the script has
not left it already, to finish alone on rank 0) and unlocks the run folder.

The trainer and `python -m gpt bench` share the machine's figures from here:
`matmul_peak_flops` (the measured matmul peak MFU divides by), `published_peak_flops`
(a GPU's datasheet dense peak) and `peak_memory_mib` (the run's peak memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import TrainConfig
from .errors import UserError
from .run_folder import RunFolder, claim_run_folder

MiB = 2**20

# ----------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; anything else as given, if this machine has it.

    A device that does not parse, that this torch cannot use (cuda without a GPU or a CUDA
    build, mps off Apple silicon) or a cuda:N beyond the visible GPUs is a UserError naming
    `key` (the flag or config field the name came from) and the devices there are.
    """
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ", ".join(["cpu", *(["cuda"] if gpus else []), *(f"cuda:{i}" for i in range(gpus)),
                           *(["mps"] if mps_available else []), "auto"])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}: unknown device {name!r}; available here: {available}") from None
    if device.type == "cuda" and not gpus:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"{key}: {name!r} is not available ({why}); available here: {available}")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise UserError(f"{key}: {name!r} does not exist: {gpus} CUDA GPU(s) are visible; available here: {available}")
    if device.type == "mps" and not mps_available:
        raise UserError(f"{key}: 'mps' is not available (it needs Apple silicon); available here: {available}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}: unknown device {name!r}; available here: {available}")
    return device


def pick_autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where `device` computes it natively (CUDA compute capability 8.0 and up,
    CPUs with AVX512-BF16/AMX), float16 on older GPUs, else float32 (no autocast)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        with torch.cuda.device(device):  # is_bf16_supported asks about the current device
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let the fp32 matmuls that remain use TF32 tensor cores (what a user training there switches on)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued on it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------
# The process: memory allocator and random number generators
# ----------------------------------------------------------------------------


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when it took effect (Linux with glibc).

    By default glibc serves every block over 32 MB with a fresh mapping and unmaps it on
    free, so each big temporary of a training step (logits, a weight gradient) costs a
    page fault per 4 KiB page, every step. Kept, the memory is reused without faults
    (BENCHMARKS.md has the measurements, from `python -m benchmarks.allocator`); the
    price is that the process keeps its peak size. The setting holds for the rest of the
    process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# The runtime of one run
# ----------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where and how a run executes; built once by `setup_runtime` before any data or model.

    A context manager: the script that opened it closes it, and so leaves the process group.
    """

    device: torch.device
    autocast_dtype: torch.dtype
    out_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    folder: RunFolder | None = None  # rank 0's claim on out_dir
    group_of_one: bool = False  # FSDP in a single process: setup_runtime made a process group of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's precision (nothing at float32)."""
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def leave_process_group(self, wait_for_others: bool = True) -> None:
        """Leave the process group (the other processes may end; rank 0 may go on alone). Normally all
        together, after a barrier (a process that exits while others still talk to it aborts them); after
        an error at once, since the others may never get there."""
        if (self.distributed or self.group_of_one) and dist.is_initialized():
            if wait_for_others and self.distributed:
                dist.barrier()
            dist.destroy_process_group()

    def close(self, wait_for_others: bool = True) -> None:
        """Leave the process group if still in it, and unlock the run folder."""
        self.leave_process_group(wait_for_others)
        if self.folder is not None:
            self.folder.release()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        self.close(wait_for_others=exc_type is None)


def setup_runtime(cfg: TrainConfig, script: str) -> Runtime:
    """Pick device and precision, join the process group under torchrun, create the run folder, seed.

    Under torchrun every process must be given the same `out_dir` (pass --train.out_dir, or the
    rank-0 timestamp would differ between processes).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if world_size > 1:
        if not cfg.out_dir:
            raise UserError("train.out_dir: set it explicitly when running under torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # code that uses "the current device" (NCCL, Triton) lands on ours
    group_of_one = False
    if (world_size > 1 or cfg.parallel == "fsdp") and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # launched by torchrun
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        else:  # FSDP in a single process started without torchrun: a process group of one
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if device.type == "cuda" else None)
            group_of_one = True
    folder = claim_run_folder(cfg, script) if rank == 0 else None
    out_dir = folder.path if folder is not None else Path(cfg.out_dir)
    dtype = pick_autocast_dtype(cfg.dtype, device)
    if device.type == "cpu" and cfg.keep_freed_memory and keep_freed_memory() and rank == 0:
        print("[train.keep_freed_memory: glibc's malloc keeps freed memory for reuse]", file=sys.stderr)
    enable_tf32(device)
    seed_everything(cfg.seed)
    return Runtime(device, dtype, out_dir, rank, world_size, local_rank, folder, group_of_one)


# ----------------------------------------------------------------------------
# What the machine can do, and what a run used
# ----------------------------------------------------------------------------

# device type -> (largest square matmul, timed repeats) of the peak measurement
PEAK_MATMUL = {"cuda": (8192, 20), "cpu": (2048, 8)}
PEAK_MATMUL_MIN_SECONDS = 0.02  # a smaller matmul that already takes this long is big enough

# Published dense peaks in TFLOP/s, (bf16, tf32), matched against the device name in this order (first match wins).
PUBLISHED_PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H200 NVL", (835.0, 418.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("GH200", (989.0, 494.7)),  # the H200 SXM's
    ("H200", (989.0, 494.7)),  # SXM
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.7)),  # SXM
    ("A100", (312.0, 156.0)),
]


@functools.cache
def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The achievable matmul FLOP/s of `device` in `dtype`, what MFU divides by.

    The best of several timed square matmuls (the repeats of PEAK_MATMUL), so a moment of
    contention on a shared machine does not lower it. Their size: doubled from 256 until one
    product takes PEAK_MATMUL_MIN_SECONDS or the device type's largest size is reached, so a
    GPU gets a matmul large enough to fill it while a CPU computing a precision slowly (bf16
    without native support) is not kept busy for minutes. Each size is warmed up first
    (library initialization, kernel selection, clock ramp-up). Measured once per process for
    each (device, dtype); the global random number generators are left alone (exact resume
    depends on them).
    """
    largest, repeats = PEAK_MATMUL.get(device.type, PEAK_MATMUL["cpu"])
    generator = torch.Generator(device=device).manual_seed(0)
    size = min(256, largest)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        a @ b  # warm-up
        if size >= largest or _product_seconds(device, a, b) >= PEAK_MATMUL_MIN_SECONDS:
            break
        size = min(2 * size, largest)
    best = min(_product_seconds(device, a, b) for _ in range(repeats))
    return 2 * size**3 / best


def _product_seconds(device: torch.device, a: torch.Tensor, b: torch.Tensor) -> float:
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - start


def published_peak_tflops(device_name: str) -> tuple[float, float] | None:
    """(bf16, tf32) dense TFLOP/s from a GPU's datasheet, for a name like "NVIDIA H100 80GB HBM3"; None if unknown."""
    return next((peaks for key, peaks in PUBLISHED_PEAK_TFLOPS if key in device_name), None)


def published_peak_flops(device: torch.device) -> dict[str, float] | None:
    """The device's published dense peak in FLOP/s per precision ("bf16", and "fp32" meaning TF32),
    if it is a GPU we know."""
    if device.type != "cuda":
        return None
    peaks = published_peak_tflops(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    return {"bf16": peaks[0] * 1e12, "fp32": peaks[1] * 1e12}


def peak_memory_mib(device: torch.device) -> float:
    """The run's peak memory in MiB. On CUDA: the most torch has held allocated on `device`
    (`torch.cuda.max_memory_allocated`); elsewhere: this process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # ru_maxrss is in KiB on Linux
