"""Optimization: a hand-written AdamW, the learning-rate schedule and gradient clipping.

Everything the training loop needs to turn gradients into parameter updates:

- `AdamW`: Adam with decoupled weight decay (Loshchilov & Hutter), a drop-in for
  `torch.optim.AdamW` with the same constructor and the same state keys. It has
  three code paths with the same math: a per-parameter loop that reads like the
  equations, a multi-tensor path (`torch._foreach_*`) that updates every
  parameter of one device and dtype with a handful of kernel calls, and a fused
  path, the equations compiled by `torch.compile` into one kernel that reads and
  writes each tensor once.
- `param_groups`: splits a model's parameters into a group with weight decay
  (matrices and embeddings) and a group without (biases and norm weights).
- `lr_at`: linear warmup, then cosine decay to a floor (or a constant rate).
- `clip_grad_norm`: rescales all gradients together so their global L2 norm is at
  most `max_norm`.

Both AdamW and `clip_grad_norm` accept DTensor parameters, as FSDP2
(`torch.distributed.fsdp.fully_shard`) makes them: each rank updates its own shard, and
the gradient norm is summed over the shards of every rank.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, DTensor, Placement

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

SCHEDULES = ("cosine", "constant")

# Per-tensor size of one batch of AdamW's multi-tensor path on the CPU: small enough that
# a batch's parameters, gradients, moments and denominators stay in cache across the passes.
FOREACH_CPU_BATCH_BYTES = 1 << 20

# With fused=True, a tensor of this many elements or more gets a call of the compiled kernel
# of its own; smaller ones are gathered into flat buffers, updated by one call and copied
# back. Around this size the copies cost about what a call does.
FUSED_MIN_ELEMENTS = 1 << 16

# One parameter's share of an update: (param, grad, exp_avg, exp_avg_sq, −step size, √(1 − β2ᵗ)).
_Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay, written out by hand.

    For each parameter θ with gradient g, at step t (counted per parameter from 1):

        θ ← θ · (1 − lr·λ)                         decoupled weight decay
        m ← β1·m + (1 − β1)·g                      first moment (mean of g)
        v ← β2·v + (1 − β2)·g²                     second moment (mean of g²)
        m̂ = m / (1 − β1ᵗ),  v̂ = v / (1 − β2ᵗ)       bias correction for the zero start
        θ ← θ − lr · m̂ / (√v̂ + ε)

    The constructor matches `torch.optim.AdamW`: `params` is an iterable of tensors
    or of param-group dicts, and every group may override `lr`, `betas`, `eps`,
    `weight_decay`, `foreach` and `fused`. The training loop may set `param_groups[i]["lr"]`
    before each step. Parameters whose `.grad` is None are skipped (their step
    count does not advance). The state of each parameter is `step` (a Python int),
    `exp_avg` (m) and `exp_avg_sq` (v), so `state_dict()` survives
    `torch.load(weights_only=True)` and a resumed run continues bit for bit.

    The parameters may be DTensors (FSDP2 shards them so). The update is elementwise, so
    each rank runs it on its local shards of the parameter, gradient and moments; the
    moments are DTensors laid out like their parameter, so `torch.distributed.checkpoint`
    saves and loads `state_dict()`.

    Three paths compute the update; `foreach` and `fused` choose, as in torch:

    - `foreach=False`: the per-parameter loop, the reference.
    - `foreach=True` or None, `fused` not True (the default): the multi-tensor path. It
      works on every device (it groups tensors by device and dtype) and rounds like the
      loop, so the two give equal results.
    - `fused=True`: the fastest path for training, on CPU and CUDA: the equations of a
      step compiled by `torch.compile` into one kernel, which reads each parameter,
      gradient and moment once and writes each once. A tensor of `FUSED_MIN_ELEMENTS`
      elements or more gets a call of its own; the smaller ones share one, gathered
      into flat buffers. Compiling takes seconds, once per process and dtype, and needs
      a C++ compiler on the CPU; where torch.compile fails, the multi-tensor path takes
      over after a warning. Non-contiguous tensors and other devices take it too. On the
      CPU the kernel rounds each operation of the equations once, exactly; the loop's
      lerp and addcmul keep a product unrounded (a fused multiply-add) and its sqrt is
      not always exact, so the two agree to float rounding, not bit for bit.

    The default needs no compiler, costs no compile time and equals the loop. A
    checkpoint's param groups carry `foreach` and `fused`, so a resumed run continues on
    the path it was saved with, bit for bit.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every parameter that has a gradient; return `closure()`'s loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse or not p.is_floating_point():
                    raise RuntimeError("AdamW needs real floating-point parameters with dense gradients")
                if not _same_layout(p, p.grad):
                    raise RuntimeError("AdamW needs each DTensor gradient sharded like its parameter")
                self._count_step(p)
            # A checkpoint's param groups from before `fused` existed lack the key.
            if group.get("fused"):
                self._update_fused(group, params)
            elif group["foreach"] is False:
                self._update_loop(group, params)
            else:
                self._update_foreach(group, self._rows(group, params))
        return loss

    def _count_step(self, param: torch.Tensor) -> None:
        """Advance the parameter's step count, creating zeroed moments on its first step."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1

    def _update_loop(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The reference path: one parameter at a time, one line per equation."""
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        for param in params:
            state = self.state[param]
            # Of a DTensor, this rank's shard: the update is elementwise.
            param, grad = _local(param), _local(param.grad)
            exp_avg, exp_avg_sq, step = _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"]

            # θ ← θ · (1 − lr·λ)
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            # m ← β1·m + (1 − β1)·g, written as a lerp from m towards g
            exp_avg.lerp_(grad, 1 - beta1)
            # v ← β2·v + (1 − β2)·g²
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # θ ← θ − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
            #   = θ − lr · m̂ / (√v̂ + ε)
            step_size, bias_correction2_sqrt = _bias_corrections(lr, beta1, beta2, step)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def _rows(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[_Row]:
        """Each parameter's tensors (this rank's shards of DTensors) with its step size and √(1 − β2ᵗ)."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        rows = []
        for param in params:
            state = self.state[param]
            # Steps can differ between parameters (one may have missed a gradient), so the
            # bias corrections go with each tensor.
            step_size, bias_correction2_sqrt = _bias_corrections(lr, beta1, beta2, state["step"])
            param, grad, exp_avg, exp_avg_sq = map(_local, (param, param.grad, state["exp_avg"], state["exp_avg_sq"]))
            rows.append((param, grad, exp_avg, exp_avg_sq, -step_size, bias_correction2_sqrt))
        return rows

    def _update_foreach(self, group: dict[str, Any], rows: list[_Row]) -> None:
        """The multi-tensor path: the loop's operations, each applied to a list of tensors at once.

        A foreach op needs its tensors on one device with one dtype, so the parameters are
        bucketed by (device, dtype). On CUDA a bucket goes whole: each op runs as a few
        multi-tensor kernels. On the CPU a foreach op is a loop over its tensors, and nine passes over a
        whole model's state run at memory speed; so there the bucket is cut into batches of
        about `FOREACH_CPU_BATCH_BYTES` per tensor (big tensors sliced into pieces), and the
        passes over one batch find it in the cache. Elementwise ops round the same either
        way, so the result does not depend on the batching.
        """
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        buckets: dict[tuple[torch.device, torch.dtype], list[_Row]] = defaultdict(list)
        for row in rows:
            buckets[(row[0].device, row[0].dtype)].append(row)

        for (device, dtype), bucket in buckets.items():
            batches: Iterable[list[_Row]] = [bucket]
            if device.type == "cpu":
                batches = _cache_sized_batches(bucket, max(1, FOREACH_CPU_BATCH_BYTES // dtype.itemsize))
            # The denominators of every batch live in one buffer: fresh temporaries per batch
            # can cost a page fault per 4 KiB, depending on the state of glibc's malloc.
            scratch = torch.empty(0, dtype=dtype, device=device)
            for batch in batches:
                columns = [list(column) for column in zip(*batch)]
                thetas, grads, exp_avgs, exp_avg_sqs, neg_step_sizes, bias_corrections2_sqrt = columns
                if weight_decay != 0:
                    torch._foreach_mul_(thetas, 1 - lr * weight_decay)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
                batch_elements = sum(t.numel() for t in exp_avg_sqs)
                if scratch.numel() < batch_elements:
                    scratch = torch.empty(batch_elements, dtype=dtype, device=device)
                denoms = _views_into(scratch, exp_avg_sqs)
                torch._foreach_copy_(denoms, exp_avg_sqs)
                torch._foreach_sqrt_(denoms)
                torch._foreach_div_(denoms, bias_corrections2_sqrt)
                torch._foreach_add_(denoms, eps)
                torch._foreach_addcdiv_(thetas, exp_avgs, denoms, neg_step_sizes)

    def _update_fused(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The fused path: one kernel call per large tensor, one per batch of small ones.

        The small tensors of one device, dtype and step (the step sets the bias corrections)
        are concatenated into four flat buffers (parameters, gradients, m, v), which one call
        updates; the parameters and moments are then copied back. Non-contiguous tensors,
        devices other than the CPU and CUDA, and everything once compiling has failed take
        the multi-tensor path.
        """
        if _fused_kernel_failed:
            self._update_foreach(group, self._rows(group, params))
            return
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        hyperparameters: dict[tuple[torch.device, torch.dtype, float, float], torch.Tensor] = {}

        def run_kernel(tensors: list[torch.Tensor], neg_step_size: float, bias_correction2_sqrt: float) -> bool:
            """Update the four flat tensors; False if the kernel is unavailable (they are then untouched)."""
            key = (tensors[0].device, tensors[0].dtype, neg_step_size, bias_correction2_sqrt)
            if key not in hyperparameters:  # one small tensor for all the parameters at the same step
                values = [1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps, neg_step_size]
                hyperparameters[key] = _hyperparameters_tensor(values, tensors[0].device, tensors[0].dtype)
            return _run_fused_kernel(*tensors, hyperparameters[key])

        rest = []
        small: dict[tuple[torch.device, torch.dtype, float, float], list[_Row]] = defaultdict(list)
        for row in self._rows(group, params):
            param, grad, exp_avg, exp_avg_sq, neg_step_size, bias_correction2_sqrt = row
            contiguous = param.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()
            if param.device.type not in ("cpu", "cuda") or not (contiguous and exp_avg_sq.is_contiguous()):
                rest.append(row)
            elif param.numel() < FUSED_MIN_ELEMENTS:
                small[(param.device, param.dtype, neg_step_size, bias_correction2_sqrt)].append(row)
            # Plain, flat, not views: torch.compile would compile anew for a Parameter, or for a view
            # of a tensor of another rank.
            elif not run_kernel([_flat(t).detach() for t in row[:4]], neg_step_size, bias_correction2_sqrt):
                rest.append(row)
        for (_, _, neg_step_size, bias_correction2_sqrt), rows in small.items():
            sizes = [row[0].numel() for row in rows]
            flat = [torch.cat([_flat(row[column]) for row in rows]) for column in range(4)]  # each (sum(sizes),)
            # Below 2 elements the compiled kernel would be compiled anew (torch.compile specializes sizes 0 and 1).
            if sum(sizes) < 2 or not run_kernel(flat, neg_step_size, bias_correction2_sqrt):
                rest.extend(rows)
                continue
            for column in (0, 2, 3):  # param, exp_avg, exp_avg_sq
                torch.split_with_sizes_copy(flat[column], sizes, out=[_flat(row[column]) for row in rows])
        self._update_foreach(group, rest)


def _adamw_elementwise(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, hyperparameters: torch.Tensor
) -> None:
    """One AdamW step of flat tensors, the loop's equations in plain arithmetic, for torch.compile to fuse.

    The inputs are read once and updated in place once. The hyperparameters come as a
    tensor (see `_hyperparameters_tensor`), not as constants, so one compiled kernel serves
    every step, learning rate and group.
    """
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size = hyperparameters.unbind()
    new_exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    new_exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    denom = new_exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    param.copy_(param * decay + neg_step_size * new_exp_avg / denom)
    exp_avg.copy_(new_exp_avg)
    exp_avg_sq.copy_(new_exp_avg_sq)


def _hyperparameters_tensor(values: list[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1 − lr·λ, 1 − β1, β2, 1 − β2, √(1 − β2ᵗ), ε, −step size) for parameters of `dtype` on `device`.

    One tensor argument costs the compiled kernel's call less than seven numbers, which it
    would wrap into a tensor each. The values are rounded as the loop's ops round a Python
    number: to float32 for float32 and narrower parameters, to float64 for float64 ones
    (so the kernel does no conversions either). On CUDA the copy goes from pinned memory,
    queued behind the device's work instead of waiting for it.
    """
    dtype = torch.promote_types(dtype, torch.float32)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# The compiled `_adamw_elementwise`, made on first use; the (device, dtype) pairs it has been
# compiled for; whether compiling has failed.
_fused_kernel: Callable[..., None] | None = None
_fused_kernel_compiled_for: set[tuple[torch.device, torch.dtype]] = set()
_fused_kernel_failed = False

# The size of the tensors the kernel is compiled with: Inductor decides from the sizes it
# compiles for whether a CPU kernel runs on all threads, and the kernel then serves all sizes.
_FUSED_COMPILE_ELEMENTS = 1 << 20


def _run_fused_kernel(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, hyperparameters: torch.Tensor
) -> bool:
    """Run the compiled `_adamw_elementwise`; False (the tensors untouched) when torch.compile is unavailable here.

    Sizes are dynamic, so one compilation per device and dtype serves every tensor. The
    first failure to compile (no C++ compiler for the CPU, no Triton for the GPU) warns
    once and turns the fused path off for the process: compiling fails before the kernel
    runs, so nothing was half updated.
    """
    global _fused_kernel, _fused_kernel_failed
    if _fused_kernel_failed:
        return False
    if _fused_kernel is None:
        _fused_kernel = torch.compile(_adamw_elementwise, dynamic=True, fullgraph=True)
    try:
        if (param.device, param.dtype) not in _fused_kernel_compiled_for:
            zeros = [torch.zeros(_FUSED_COMPILE_ELEMENTS, device=param.device, dtype=param.dtype) for _ in range(4)]
            _fused_kernel(*zeros, hyperparameters)  # zero moments and gradients: the zeros stay zeros
            _fused_kernel_compiled_for.add((param.device, param.dtype))
        _fused_kernel(param, grad, exp_avg, exp_avg_sq, hyperparameters)
    except torch._dynamo.exc.TorchDynamoException as error:  # how torch.compile reports a failure to compile
        _fused_kernel_failed = True
        reason = " ".join(str(error).split("\n\n")[0].split())  # without torch's advice on logging
        warnings.warn(
            "AdamW(fused=True): torch.compile failed here, so the multi-tensor path updates the"
            f" parameters instead (as with foreach=True). The error: {reason}",
            stacklevel=2,
        )
        return False
    return True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or of a DTensor the shard this rank holds (a view: updating it updates the DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as one dimension (a view; the tensor itself if it has one already)."""
    return tensor if tensor.ndim == 1 else tensor.view(-1)


def _same_layout(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `grad` is a plain tensor like `param`, or a DTensor sharded over the same mesh the same way."""
    if isinstance(param, DTensor) and isinstance(grad, DTensor):
        return grad.device_mesh == param.device_mesh and grad.placements == param.placements
    return not isinstance(param, DTensor) and not isinstance(grad, DTensor)


def _views_into(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views into the flat `buffer`, one per tensor of `like`, with its shape."""
    views = []
    offset = 0
    for tensor in like:
        views.append(buffer[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


def _cache_sized_batches(rows: list[_Row], max_elements: int) -> Iterator[list[_Row]]:
    """Regroup rows into batches of at most `max_elements` elements per tensor column.

    A row whose tensors are bigger is cut into pieces (views into the same storage, so
    updating a piece updates the tensor); small rows share a batch. A row with a
    non-contiguous tensor cannot be sliced flat and travels whole, alone if need be.
    """
    batch: list[_Row] = []
    batch_elements = 0
    for *tensors, neg_step_size, bias_correction2_sqrt in rows:
        numel = tensors[0].numel()
        if all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            pieces = [
                [t[start : start + max_elements] for t in flat] for start in range(0, numel, max_elements)
            ]
        else:
            pieces = [tensors]
        for piece in pieces:
            piece_elements = piece[0].numel()
            if batch and batch_elements + piece_elements > max_elements:
                yield batch
                batch, batch_elements = [], 0
            batch.append((*piece, neg_step_size, bias_correction2_sqrt))
            batch_elements += piece_elements
    if batch:
        yield batch


def _bias_corrections(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Return (lr / (1 − β1ᵗ), √(1 − β2ᵗ)): the step size and the divisor of √v at step t."""
    return lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a weight-decayed group and a group without decay.

    Weight decay applies to tensors with two or more dimensions (matmul weights and
    embeddings); biases and norm weights (one dimension) get none. Frozen parameters
    are left out, a parameter shared by two modules appears once, and each group keeps
    the order of `model.named_parameters()`. Empty groups are dropped.
    """
    trainable = [p for _, p in model.named_parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.ndim >= 2]
    not_decayed = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def lr_at(
    step: int,
    *,
    lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float,
    schedule: str = "cosine",
) -> float:
    """The learning rate for optimizer step `step` (0-based: the first update is step 0).

    Warmup: steps 0 .. warmup_steps−1 rise linearly, step s getting lr·(s+1)/warmup_steps,
    so step 0 already trains (at lr/warmup_steps) and the last warmup step reaches lr.
    With schedule="constant" every later step gets lr. With schedule="cosine" the rate
    then follows half a cosine from lr at step warmup_steps down to min_lr at step
    max_steps, and stays at min_lr from there on:

        progress = (s − warmup_steps) / (max_steps − warmup_steps)
        lr_s     = min_lr + (lr − min_lr) · (1 + cos(π · progress)) / 2

    A short run with max_steps <= warmup_steps ends inside the warmup (the schedule is
    still defined: min_lr after warmup).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")

    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so their global L2 norm is at most `max_norm`; return that norm.

    The global norm is √(Σ‖g‖²) over every parameter that has a gradient, taken before
    clipping. When it exceeds `max_norm`, every gradient is multiplied by
    max_norm / (norm + 1e-6) (the 1e-6 guards the division, as in
    `torch.nn.utils.clip_grad_norm_`, whose results this matches). The norm comes back as
    a 0-d tensor on the first gradient's device, without waiting for the device. It may
    be inf or nan; the gradients are then unusable, and the caller should skip the step.

    DTensor gradients (FSDP2's) count whole: the squared norms of this rank's shards are
    summed over the ranks that hold the other shards, so every rank gets the same plain
    tensor, the norm of the unsharded gradients. This is a collective: every rank of the
    mesh must call it.
    """
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    plain_buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    sharded_groups: dict[tuple[DeviceMesh, tuple[Placement, ...]], list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        if isinstance(grad, DTensor):
            sharded_groups[(grad.device_mesh, grad.placements)].append(grad.to_local())
        else:
            plain_buckets[(grad.device, grad.dtype)].append(grad)

    norm_device = _local(grads[0]).device
    norms = [norm.to(norm_device) for bucket in plain_buckets.values() for norm in torch._foreach_norm(bucket)]
    for (mesh, placements), shards in sharded_groups.items():
        norms.append(_sharded_norm(shards, mesh, placements).to(norm_device))
    total_norm = torch.linalg.vector_norm(torch.stack(norms))

    # min(1, max_norm / norm) as a tensor: no .item(), so no wait for the device.
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    local_buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in map(_local, grads):
        local_buckets[(grad.device, grad.dtype)].append(grad)
    for (device, _), bucket in local_buckets.items():
        torch._foreach_mul_(bucket, scale.to(device))
    return total_norm


def _sharded_norm(shards: list[torch.Tensor], mesh: DeviceMesh, placements: tuple[Placement, ...]) -> torch.Tensor:
    """The L2 norm of whole DTensors, from this rank's `shards` of them, laid out on `mesh` by `placements`.

    The squared norms of the shards are summed over each mesh dimension that shards the
    tensors; along a dimension that replicates them every rank holds the same values, which
    must count once, so there is nothing to add.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for shard in shards:
        buckets[(shard.device, shard.dtype)].append(shard)
    device = shards[0].device
    norms = torch.stack([norm.to(device) for bucket in buckets.values() for norm in torch._foreach_norm(bucket)])
    # At least float32 for the sum that crosses the ranks.
    squared_sum = norms.to(torch.promote_types(norms.dtype, torch.float32)).square().sum()
    for mesh_dim, placement in enumerate(placements):
        if placement.is_partial():
            raise RuntimeError(f"clip_grad_norm needs reduced gradients, got a DTensor placed {placement}")
        if placement.is_shard():
            dist.all_reduce(squared_sum, group=mesh.get_group(mesh_dim))
    return squared_sum.sqrt()
