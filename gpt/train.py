"""The one training loop, shared by pretraining and both kinds of fine-tuning.

A script sets up a `Runtime` (device, precision, processes, run folder, seeds),
builds its data with the runtime's rank and world size, describes the work as a
`TrainTask` (model, batches, a loss, an evaluation), and calls `train`. The loop
then does, for each optimizer step:

    lr from the schedule
    grad_accum_steps x (next micro-batch -> autocast forward -> loss / accum -> backward)
    stop with a clear message if the loss or the gradient norm is not finite
    clip the global gradient norm, optimizer step, zero the gradients
    log to metrics.jsonl (+ progress bar, W&B, TensorBoard)
    every eval_interval steps: validation loss and perplexity, latest/best checkpoints,
    early stopping on the validation loss

Checkpoints hold everything a run needs to continue bit for bit: model, optimizer,
step, RNG states, data position, best loss and patience. Under `torchrun` the model is
wrapped in DistributedDataParallel; gradients are synced on the last micro-step only,
and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, load_model_state, save_checkpoint
from .config import TrainConfig
from .errors import UserError
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at, param_groups

# ----------------------------------------------------------------------------
# Runtime: device, precision, processes, run folder
# ----------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda if available, else mps, else cpu; anything else as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: unknown device {name!r}") from None


def pick_autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    float16 on older GPUs, else float32 (no autocast)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class Runtime:
    """Where and how a run executes; built once by `setup_runtime` before any data or model."""

    device: torch.device
    autocast_dtype: torch.dtype
    out_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Leave the process group together (a process that exits while others still talk to it aborts them)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def peak_memory_mib() -> float:
    """This process's peak resident memory (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when it took effect (Linux with glibc).

    By default glibc serves every block over 32 MB with a fresh mapping and unmaps it on
    free, so each big temporary of a training step (logits, a weight gradient) costs a
    page fault per 4 KiB page, every step. `python -m benchmarks.allocator` measured 470K
    faults and 0.8 s of kernel time per step for transformers' GPT-2 at tiny, and 7%
    (fp32) to 19% (bf16) faster steps for ours once the memory is kept. The setting holds for
    the rest of the process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def setup_runtime(cfg: TrainConfig, script: str) -> Runtime:
    """Pick device and precision, join the process group under torchrun, create the run folder, seed.

    Under torchrun every process must be given the same `out_dir` (pass --train.out_dir, or the
    rank-0 timestamp would differ between processes).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if not cfg.out_dir:
            raise UserError("train.out_dir: set it explicitly when running under torchrun")
    out_dir = Path(cfg.out_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dtype = pick_autocast_dtype(cfg.dtype, device)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    return Runtime(device, dtype, out_dir, rank, world_size, local_rank)


# ----------------------------------------------------------------------------
# What a script hands the loop
# ----------------------------------------------------------------------------


class BatchSource(Protocol):
    """Training batches in a resumable order (gpt.data.BatchLoader is one)."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainTask:
    """The parts of training that differ between scripts.

    `loss(model, batch)` returns the mean loss of a micro-batch (autocast is already on);
    `evaluate(model)` returns validation metrics with at least "loss";
    `batch_tokens(batch)` counts the tokens a batch trains on (for tokens/s and MFU);
    `sequence_length(batch)`, when given, the length of its rows (the attention FLOPs in MFU
    depend on it; without it, rows are taken to fill the model's context).
    """

    model: GPT
    train_batches: BatchSource
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    batch_tokens: Callable[[Any], int]
    sequence_length: Callable[[Any], int] | None = None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer name, label names
    tokenizer: str = "gpt2"


@dataclass
class TrainResult:
    steps: int
    best_val_loss: float
    last_val: dict[str, float]
    stopped_early: bool
    interrupted: bool
    train_seconds: float
    tokens_per_s: float


class TrainingStopped(UserError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is untouched."""


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (always) plus Weights & Biases and TensorBoard when asked for; rank 0 only."""

    def __init__(self, runtime: Runtime, cfg: TrainConfig, run_config: dict[str, Any], resume_step: int | None):
        self.enabled = runtime.is_main
        self.path = runtime.out_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            self._drop_lines_after(resume_step)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb_project is set but wandb is not installed: pip install 'gpt[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(runtime.out_dir))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard is on but tensorboard is not installed: pip install 'gpt[tensorboard]'") from None
            self.tensorboard = SummaryWriter(str(runtime.out_dir / "tensorboard"))
        self.file = self.path.open("a", encoding="utf-8")

    def _drop_lines_after(self, step: int) -> None:
        """On resume, forget what an interrupted run logged after its last checkpoint (rewritten atomically)."""
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{record['split']}/{k}": v for k, v in record.items()
                   if k not in ("step", "split") and isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable matmul FLOP/s on this device in this precision (for MFU): the best of a few timed
    square matmuls, so a moment of contention on a shared machine does not lower the estimate."""
    n = 4096 if device.type == "cuda" else 1024
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (and exact resume) alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best = math.inf
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (alone, or in tuples, lists and dicts) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


# ----------------------------------------------------------------------------
# Exact-resume state
# ----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every random number generator a run touches, as plain containers and tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """python's random state is nested tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits.
    A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping]",
              file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """`auto` -> out_dir/checkpoints/latest.pt if it exists (else start fresh); a path -> that file."""
    if not resume:
        return None
    if resume == "auto":
        latest = out_dir / "checkpoints" / "latest.pt"
        return latest if latest.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.exists():
        raise UserError(f"train.resume: checkpoint {path} not found")
    return path


def train(task: TrainTask, cfg: TrainConfig, runtime: Runtime, run_config: dict[str, Any]) -> TrainResult:
    """Run the loop described at the top of this module; returns what happened."""
    model = task.model.to(runtime.device)
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, best_val_loss, evals_without_improvement = 0, math.inf, 0
    resume_path = find_resume_checkpoint(cfg.resume, runtime.out_dir)
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location=runtime.device)
        load_model_state(model, state["model"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        task.train_batches.load_state_dict(state["data"])
        step, best_val_loss = state["step"], state["best_val_loss"]
        evals_without_improvement = state["evals_without_improvement"]
        set_rng_state(state["rng"])
        if runtime.is_main:
            print(f"[resumed from {resume_path} at step {step}]", file=sys.stderr)

    ddp_model: torch.nn.Module = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loss_fn = torch.compile(task.loss) if cfg.compile else task.loss
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype == torch.float16)

    log = MetricsLog(runtime, cfg, run_config, step if resume_path is not None else None)
    peak_flops = measured_peak_flops(runtime.device, runtime.autocast_dtype) if runtime.is_main else 0.0
    flops_per_token_at: dict[int | None, float] = {}  # sequence length -> model FLOPs per token
    checkpoint_dir = runtime.out_dir / "checkpoints"

    def save(name: str) -> None:
        if not runtime.is_main:
            return
        save_checkpoint(
            checkpoint_dir / f"{name}.pt", model, tokenizer=task.tokenizer,
            optimizer=optimizer.state_dict(), step=step, rng=rng_state(), data=task.train_batches.state_dict(),
            best_val_loss=best_val_loss, evals_without_improvement=evals_without_improvement,
            train_config=cfg.to_dict(), **task.checkpoint_extra,
        )

    def run_eval() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), runtime.autocast():
            metrics = task.evaluate(model)
        model.train()
        metrics.setdefault("ppl", math.exp(min(metrics["loss"], 50.0)))
        return metrics

    def say(message: str) -> None:
        if runtime.is_main:
            progress.write(message)

    last_val: dict[str, float] = {}
    stopped_early = interrupted = False
    tokens_seen, train_seconds = 0, 0.0
    model.train()
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not runtime.is_main, dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s
    try:
        with _StopSignal() as stop:
            if step == 0:  # the untrained model's validation loss, the baseline of the curve
                last_val = run_eval()
                log.log({"step": 0, "split": "val", **last_val, "lr": 0.0, "tokens_per_s": 0.0})
                say(f"step 0: val loss {last_val['loss']:.4f}, ppl {last_val['ppl']:.2f}")
            while step < cfg.max_steps:
                started = time.perf_counter()
                lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                           min_lr=cfg.min_lr, schedule=cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                loss_sum, step_tokens = torch.zeros((), device=runtime.device), 0
                for micro in range(cfg.grad_accum_steps):
                    batch = move_to(task.train_batches.next_batch(), runtime.device)
                    step_tokens += task.batch_tokens(batch)
                    sequence_length = task.sequence_length(batch) if task.sequence_length else None
                    last_micro = micro == cfg.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if last_micro or not runtime.distributed else ddp_model.no_sync()
                    with sync:
                        with runtime.autocast():
                            loss = loss_fn(ddp_model, batch) / cfg.grad_accum_steps
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()

                if runtime.distributed:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                    step_tokens *= runtime.world_size
                scaler.unscale_(optimizer)
                grad_norm = clip_grad_norm(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                train_loss, grad_norm_value = loss_sum.item(), grad_norm.item()
                if not math.isfinite(train_loss) or (not math.isfinite(grad_norm_value) and not scaler.is_enabled()):
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingStopped(
                        f"non-finite {'loss' if not math.isfinite(train_loss) else 'gradient norm'} at step {step + 1} "
                        f"(loss {train_loss}, grad norm {grad_norm_value}); the optimizer step was skipped and "
                        f"the last good checkpoint in {checkpoint_dir} is untouched. Try a lower train.lr."
                    )
                scaler.step(optimizer)  # with fp16, skips the step itself when gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                elapsed = time.perf_counter() - started
                train_seconds += elapsed
                tokens_seen += step_tokens
                tokens_per_s = step_tokens / elapsed
                if sequence_length not in flops_per_token_at:
                    flops_per_token_at[sequence_length] = model.flops_per_token(sequence_length)
                flops_per_token = flops_per_token_at[sequence_length]
                mfu = flops_per_token * tokens_per_s / peak_flops / runtime.world_size if peak_flops else 0.0
                progress.update(1)
                progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                     mfu=f"{100 * mfu:.0f}%")
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    log.log({"step": step, "split": "train", "loss": train_loss, "lr": lr,
                             "tokens_per_s": tokens_per_s, "grad_norm": grad_norm_value, "mfu": mfu,
                             "tokens": tokens_seen})

                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    last_val = run_eval()
                    improved = last_val["loss"] < best_val_loss
                    if improved:
                        best_val_loss, evals_without_improvement = last_val["loss"], 0
                    else:
                        evals_without_improvement += 1
                    log.log({"step": step, "split": "val", **last_val, "lr": lr,
                             "tokens_per_s": tokens_seen / max(train_seconds, 1e-9)})
                    say(f"step {step}: val loss {last_val['loss']:.4f}, ppl {last_val['ppl']:.2f}"
                                   + (" (best)" if improved else ""))
                    save("latest")
                    if improved:
                        save("best")
                    if cfg.patience and evals_without_improvement >= cfg.patience:
                        say(f"early stop: no improvement in {cfg.patience} evaluations")
                        stopped_early = True
                        break
                if runtime.distributed:  # every process stops together, or the others would hang
                    flag = torch.tensor(float(stop.requested), device=runtime.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop.requested = bool(flag.item())
                if stop.requested:
                    save("latest")
                    say(f"stopped at step {step}; resume with --train.resume auto "
                                   f"--train.out_dir {runtime.out_dir}")
                    interrupted = True
                    break
    finally:
        progress.close()
        log.close()
        runtime.close()  # what scripts do after training is rank-0 work that needs no process group
    return TrainResult(step, best_val_loss, last_val, stopped_early, interrupted, train_seconds,
                       tokens_seen / max(train_seconds, 1e-9))

