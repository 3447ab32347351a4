"""The one training loop, shared by pretraining and both kinds of fine-tuning.

A script opens a `Runtime` (gpt.runtime: device, precision, processes, run folder,
seeds), builds its data with the runtime's rank and world size, describes the work as a
`TrainTask` (model, batches, a loss, an evaluation), and calls `train`. The loop then
does, for each optimizer step:

    lr from the schedule                                                    optimizer_step
    grad_accum_steps x (next micro-batch -> autocast forward -> loss / accum -> backward)
    stop with a clear message if the loss or the gradient norm is not finite
    clip the global gradient norm, optimizer step, zero the gradients
    log to metrics.jsonl (+ progress bar, W&B, TensorBoard)                  RunReport.step
    every eval_interval steps: validation loss and perplexity, latest/best  evaluate_and_checkpoint
    checkpoints, early stopping on the validation loss
    on SIGINT/SIGTERM: save the latest checkpoint and stop                   _StopSignal
    however the run ends: curves.png in the run folder (gpt.curves)         train

"best" is only ever a finite validation loss no more than DIVERGED_FACTOR times the
untrained model's: a run that blows up does not save its blown-up weights as its best.
An interrupted run reports the signal (`TrainResult.exit_code`: 130 for Ctrl-C, 143 for
SIGTERM), and a second Ctrl-C during a checkpoint write waits for the write to finish.

Checkpoints hold everything a run needs to continue bit for bit: model, optimizer,
gradient scaler (fp16), step, RNG states (gpt.resume), data position, best loss and
patience, and the counters metrics.jsonl reports (tokens seen, training time).

Under `torchrun` the processes share the work as `train.parallel` says (gpt.parallel):
DistributedDataParallel by default, or FSDP2, which shards parameters, gradients and
optimizer state across the processes. Gradients are synced on the last micro-step only;
rank 0 alone logs. Under DDP rank 0 writes the checkpoints (`checkpoints/latest.pt`);
under FSDP every process writes its shards of a checkpoint folder (`checkpoints/latest/`,
gpt.sharded_checkpoint), and at the end rank 0 gets the whole trained model
(`TrainResult.model`) for what the script does alone.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import FORMAT, VERSION, load_model_state, save_checkpoint
from .config import TrainConfig
from .curves import plot_run_curves
from .errors import UserError
from .metrics_log import MetricsLog
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_at, param_groups
from .parallel import gather_model, gradient_sync, parallel_mode, set_activation_checkpointing, shard_model, skeleton_of
from .resume import check_same_model, load_resume_checkpoint, rng_state, set_rng_state
from .runtime import Runtime, matmul_peak_flops, peak_memory_mib
from .sharded_checkpoint import load_sharded, save_sharded

# ----------------------------------------------------------------------------
# What a script hands the loop, and what it gets back
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
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
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
    stop_signal: int | None  # the signal that interrupted the run (saved first), or None
    train_seconds: float
    tokens_per_s: float
    model: nn.Module | None = None  # the trained model, whole, on rank 0 (None on the other processes)

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None

    @property
    def exit_code(self) -> int:
        """0, or what a shell reports for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.stop_signal if self.stop_signal is not None else 0


DIVERGED_FACTOR = 2.0  # a validation loss above this times the untrained model's is never "best"


class TrainingStopped(UserError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is untouched."""


# ----------------------------------------------------------------------------
# The state of a run: building it, checkpointing it, resuming it
# ----------------------------------------------------------------------------


@dataclass
class RunState:
    """A run in progress: what trains, and the counters a checkpoint saves."""

    model: GPT  # sharded in place under FSDP
    parallel_model: nn.Module  # what the loss calls: the model, or its DistributedDataParallel wrapper
    optimizer: AdamW
    scaler: torch.amp.GradScaler  # enabled for float16 autocast only
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    trainable: list[torch.Tensor]
    stop: _StopSignal
    parallel: str = "none"  # none | ddp | fsdp (gpt.parallel.parallel_mode)
    skeleton: nn.Module | None = None  # under FSDP: the model's unsharded shape, filled by gather_model at the end
    step: int = 0
    best_val_loss: float = math.inf
    initial_val_loss: float = math.inf  # the untrained model's (step 0)
    evals_without_improvement: int = 0
    last_val: dict[str, float] = field(default_factory=dict)
    tokens_seen: int = 0
    train_seconds: float = 0.0


def start_run(task: TrainTask, cfg: TrainConfig, runtime: Runtime, stop: _StopSignal) -> RunState:
    """The model on its device (sharded under FSDP, wrapped under DDP) with optimizer and gradient scaler,
    resumed when asked."""
    model = task.model.to(runtime.device)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    parallel, skeleton = parallel_mode(cfg.parallel, runtime), None
    if parallel == "fsdp":
        skeleton = skeleton_of(model)
        shard_model(model, runtime)  # before the optimizer: it must hold the sharded parameters
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      fused=cfg.fused_optimizer)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype == torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = RunState(model, model, optimizer, scaler, task.loss, trainable, stop, parallel, skeleton)
    resume_from = load_resume_checkpoint(cfg.resume, runtime.out_dir)
    if resume_from is not None:
        restore(run, task, *resume_from, runtime)
        for group in optimizer.param_groups:  # the checkpoint's groups carry the path it was trained with
            group["fused"] = cfg.fused_optimizer
    if parallel == "ddp":
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # Buffers (RoPE tables, causal masks) are derived from the config, the same on every rank: not resent.
        run.parallel_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                                 broadcast_buffers=False)
    if cfg.compile:
        run.loss_fn = torch.compile(task.loss)
    model.train()
    return run


def restore(run: RunState, task: TrainTask, state: dict[str, Any], path: Path, runtime: Runtime) -> None:
    """Continue from a checkpoint (loaded onto the CPU; load_state_dict copies to the parameters' device):
    weights, optimizer, gradient scaler, data position, counters, RNG states. A sharded checkpoint's `state`
    is its meta: its tensors load straight into the (sharded or whole) model and optimizer."""
    check_same_model(state, path, run.model.config, task.tokenizer)
    if path.is_dir():
        load_sharded(path, run.model, run.optimizer)
    elif run.parallel == "fsdp":
        raise UserError(f"train.resume: {path} is an ordinary checkpoint; a run with train.parallel fsdp resumes "
                        f"from a sharded one; write one with: python -m gpt consolidate {path} --out FOLDER")
    else:
        load_model_state(run.model, state["model"], path)
        run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # fp16 runs only; checkpoints from before it was saved have none
        run.scaler.load_state_dict(state["scaler"])
    task.train_batches.load_state_dict(state["data"])
    run.step, run.best_val_loss = state["step"], state["best_val_loss"]
    run.evals_without_improvement = state["evals_without_improvement"]
    # Checkpoints from before these were saved have none: the counters then restart.
    run.initial_val_loss = state.get("initial_val_loss", math.inf)
    run.tokens_seen, run.train_seconds = state.get("tokens_seen", 0), state.get("train_seconds", 0.0)
    set_rng_state(state["rng"], runtime.device)
    if runtime.is_main:
        print(f"[resumed from {path} at step {run.step}]", file=sys.stderr)


def save(run: RunState, name: str, task: TrainTask, cfg: TrainConfig, runtime: Runtime) -> None:
    """checkpoints/{name}.pt with everything an exact resume needs, written by rank 0; under FSDP the sharded
    folder checkpoints/{name}/, every process writing its shards."""
    if run.parallel != "fsdp" and not runtime.is_main:
        return
    scaler = {"scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {}
    fields = dict(
        step=run.step, rng=rng_state(runtime.device), data=task.train_batches.state_dict(),
        best_val_loss=run.best_val_loss, initial_val_loss=run.initial_val_loss,
        evals_without_improvement=run.evals_without_improvement, tokens_seen=run.tokens_seen,
        train_seconds=run.train_seconds, train_config=cfg.to_dict(), **scaler, **task.checkpoint_extra,
    )
    folder = runtime.out_dir / "checkpoints"
    with run.stop.finish_writes_first():
        if run.parallel == "fsdp":
            meta = dict(format=FORMAT, version=VERSION, model_config=run.model.config.to_dict(),
                        tokenizer=task.tokenizer, **fields)
            save_sharded(folder / name, run.model, run.optimizer, meta, runtime.is_main)
        else:
            save_checkpoint(folder / f"{name}.pt", run.model, tokenizer=task.tokenizer,
                            optimizer=run.optimizer.state_dict(), **fields)


# ----------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step reports (tokens summed over all processes)."""

    lr: float
    loss: float
    grad_norm: float
    tokens: int
    sequence_length: int | None  # of the last micro-batch's rows; None: the model's context
    seconds: float


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (alone, or in tuples, lists and dicts) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def accumulate_gradients(
    run: RunState, task: TrainTask, cfg: TrainConfig, runtime: Runtime
) -> tuple[torch.Tensor, int, int | None]:
    """grad_accum_steps micro-batches forward and backward, each loss divided by their number, so the
    gradients add up to those of their mean (synced across processes on the last micro-batch only).
    Returns the mean loss (a 0-d tensor on the device), this process's tokens, and the last sequence length."""
    loss_sum, tokens, sequence_length = torch.zeros((), device=runtime.device), 0, None
    for micro in range(cfg.grad_accum_steps):
        batch = move_to(task.train_batches.next_batch(), runtime.device)
        tokens += task.batch_tokens(batch)
        sequence_length = task.sequence_length(batch) if task.sequence_length else None
        with gradient_sync(run.parallel_model, sync=micro == cfg.grad_accum_steps - 1):
            with runtime.autocast():
                loss = run.loss_fn(run.parallel_model, batch) / cfg.grad_accum_steps
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum, tokens, sequence_length


def optimizer_step(run: RunState, task: TrainTask, cfg: TrainConfig, runtime: Runtime) -> StepStats:
    """lr from the schedule, accumulated gradients, a finite check, clipping, the step; advances run.step."""
    started = time.perf_counter()
    lr = lr_at(run.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
               min_lr=cfg.min_lr, schedule=cfg.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens, sequence_length = accumulate_gradients(run, task, cfg, runtime)
    if runtime.distributed:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        tokens *= runtime.world_size
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad_norm(run.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    loss, grad_norm_value = loss_sum.item(), grad_norm.item()
    if not math.isfinite(loss) or (not math.isfinite(grad_norm_value) and not run.scaler.is_enabled()):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingStopped(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {run.step + 1} "
            f"(loss {loss}, grad norm {grad_norm_value}); the optimizer step was skipped and "
            f"the last good checkpoint in {runtime.out_dir / 'checkpoints'} is untouched. Try a lower train.lr."
        )
    run.scaler.step(run.optimizer)  # with fp16, skips the step itself when gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    seconds = time.perf_counter() - started
    run.train_seconds += seconds
    run.tokens_seen += tokens
    return StepStats(lr, loss, grad_norm_value, tokens, sequence_length, seconds)


# ----------------------------------------------------------------------------
# Reporting, evaluating, stopping
# ----------------------------------------------------------------------------


class RunReport:
    """What a run tells, on rank 0: metrics.jsonl (+ W&B, TensorBoard), the progress bar, messages."""

    def __init__(self, run: RunState, cfg: TrainConfig, runtime: Runtime, run_config: dict[str, Any]):
        self.cfg, self.runtime = cfg, runtime
        self.log = MetricsLog(runtime, cfg, run_config, run.step)
        self.peak_flops = matmul_peak_flops(runtime.device, runtime.autocast_dtype) if runtime.is_main else 0.0
        self.flops_per_token_at: dict[int | None, float] = {}  # sequence length -> model FLOPs per token
        self.progress = tqdm(total=cfg.max_steps, initial=run.step, desc="train", disable=not runtime.is_main,
                             dynamic_ncols=True,
                             mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s

    def say(self, message: str) -> None:
        if self.runtime.is_main:
            self.progress.write(message)

    def step(self, run: RunState, stats: StepStats) -> None:
        """The progress bar after every step; a "train" record every log_interval steps and at the last."""
        tokens_per_s = stats.tokens / stats.seconds
        if stats.sequence_length not in self.flops_per_token_at:
            self.flops_per_token_at[stats.sequence_length] = run.model.flops_per_token(stats.sequence_length)
        achieved = self.flops_per_token_at[stats.sequence_length] * tokens_per_s
        mfu = achieved / self.peak_flops / self.runtime.world_size if self.peak_flops else 0.0
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                  mfu=f"{100 * mfu:.0f}%")
        if run.step % self.cfg.log_interval == 0 or run.step == self.cfg.max_steps:
            self.log.log({"step": run.step, "split": "train", "loss": stats.loss, "lr": stats.lr,
                          "tokens_per_s": tokens_per_s, "grad_norm": stats.grad_norm, "mfu": mfu,
                          "tokens": run.tokens_seen, "peak_memory_mib": round(peak_memory_mib(self.runtime.device))})

    def validation(self, run: RunState, lr: float, improved: bool) -> None:
        """A "val" record of run.last_val, and its line on the terminal."""
        self.log.log({"step": run.step, "split": "val", **run.last_val, "lr": lr,
                      "tokens_per_s": run.tokens_seen / max(run.train_seconds, 1e-9), "tokens_seen": run.tokens_seen})
        self.say(f"step {run.step}: val loss {run.last_val['loss']:.4f}, ppl {run.last_val['ppl']:.2f}"
                 + (" (best)" if improved else ""))

    def close(self) -> None:
        self.progress.close()
        self.log.close()


def evaluate(model: GPT, task: TrainTask, runtime: Runtime) -> dict[str, float]:
    """The task's validation metrics in eval mode under autocast, with perplexity added if it has none."""
    model.eval()
    with torch.no_grad(), runtime.autocast():
        metrics = task.evaluate(model)
    model.train()
    metrics.setdefault("ppl", math.exp(min(metrics["loss"], 50.0)))
    return metrics


def evaluate_and_checkpoint(
    run: RunState, task: TrainTask, cfg: TrainConfig, runtime: Runtime, report: RunReport, lr: float
) -> bool:
    """Validation, the latest checkpoint (and the best, when the loss improved); True when patience ran out."""
    run.last_val = evaluate(run.model, task, runtime)
    loss = run.last_val["loss"]
    diverged = not math.isfinite(loss) or loss > DIVERGED_FACTOR * run.initial_val_loss
    # Taken by all processes together: under FSDP writing "best" is a collective every process must join.
    improved = any_process(not diverged and loss < run.best_val_loss, runtime)
    if diverged:
        why = "not finite" if not math.isfinite(loss) else (
            f"over {DIVERGED_FACTOR:g} times the untrained model's {run.initial_val_loss:.4g}")
        report.say(f"step {run.step}: validation loss {loss:.4g} is {why}: the run has diverged, and these "
                   f"weights are not kept as the best (try a lower train.lr)")
    if improved:
        run.best_val_loss, run.evals_without_improvement = run.last_val["loss"], 0
    else:
        run.evals_without_improvement += 1
    report.validation(run, lr, improved)
    save(run, "latest", task, cfg, runtime)
    if improved:
        save(run, "best", task, cfg, runtime)
    if cfg.patience and run.evals_without_improvement >= cfg.patience:
        report.say(f"early stop: no improvement in {cfg.patience} evaluations")
        return True
    return False


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits.
    A second Ctrl-C interrupts at once, or, during a checkpoint write, as soon as the write is done."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._writing = self._interrupt_after_write = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            if not self._writing:
                raise KeyboardInterrupt
            self._interrupt_after_write = True
            print("\n[finishing the checkpoint write first]", file=sys.stderr)
            return
        self.requested, self.signum = True, self.signum or signum
        print(f"\n[{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping]",
              file=sys.stderr)

    @contextlib.contextmanager
    def finish_writes_first(self) -> Any:
        """Within this block a second Ctrl-C waits until the block is done (a checkpoint is never cut short)."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._interrupt_after_write:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_process(flag: bool, runtime: Runtime) -> bool:
    """Whether `flag` is true in any process: a decision to stop is taken by all of them together,
    or the others would hang in their next collective."""
    if not runtime.distributed:
        return flag
    tensor = torch.tensor(float(flag), device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train(task: TrainTask, cfg: TrainConfig, runtime: Runtime, run_config: dict[str, Any]) -> TrainResult:
    """Run the loop described at the top of this module; returns what happened.

    The runtime stays open: the script that opened it closes it (and so leaves the process group).
    """
    stop = _StopSignal()
    run = start_run(task, cfg, runtime, stop)
    report = RunReport(run, cfg, runtime, run_config)
    stopped_early, stop_signal = False, None
    try:
        with stop:
            if run.step == 0:  # the untrained model's validation loss, the baseline of the curve
                run.last_val = evaluate(run.model, task, runtime)
                run.initial_val_loss = run.last_val["loss"]
                report.validation(run, lr=0.0, improved=False)
            while run.step < cfg.max_steps:
                stats = optimizer_step(run, task, cfg, runtime)
                report.step(run, stats)
                if run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps:
                    patience_ran_out = evaluate_and_checkpoint(run, task, cfg, runtime, report, stats.lr)
                    stopped_early = any_process(patience_ran_out, runtime)
                    if stopped_early:
                        break
                if any_process(stop.requested, runtime):
                    save(run, "latest", task, cfg, runtime)
                    report.say(f"stopped at step {run.step}; resume with --train.resume auto "
                               f"--train.out_dir {runtime.out_dir}")
                    stop_signal = stop.signum or signal.SIGTERM  # without one here, another process got it
                    break
    finally:
        report.close()
        # Finished, stopped or failed, the run is saved by now: curves.png, where a failure is only a note.
        # A second Ctrl-C (KeyboardInterrupt) asked to be out at once: no plot then.
        if cfg.curves and runtime.is_main and not isinstance(sys.exception(), KeyboardInterrupt):
            try:
                plot_run_curves(runtime.out_dir)
            except Exception as err:
                print(f"[curves.png not written: {err}]", file=sys.stderr)
    model = gather_model(run.model, run.skeleton, runtime) if run.skeleton is not None else run.model
    return TrainResult(run.step, run.best_val_loss, run.last_val, stopped_early, stop_signal, run.train_seconds,
                       run.tokens_seen / max(run.train_seconds, 1e-9), model if runtime.is_main else None)
