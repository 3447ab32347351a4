"""The LM head and its cross-entropy loss, fused: the loss without the (N, vocab) logits tensor.

The plain loss is `F.cross_entropy(lm_head(hidden), targets)` (`GPT.forward` with
`loss_impl="plain"`). It builds the whole logits tensor (N rows x vocab: 412 MB for a
batch of 8 x 256 tokens of GPT-2's vocabulary in float32), keeps it for backward and,
under autocast, makes a float32 copy. `linear_cross_entropy` computes the same loss and
the same gradients a chunk of rows at a time, so each chunk's logits live only briefly:

    for each chunk of rows:
        logits = hidden @ weight.T                          (c, V), in the matmul dtype
        loss  += log-sum-exp(logits) - logits[target]       the softmax in float32
        if gradients are wanted (autograd on):
            logits <- softmax(logits) - one_hot(targets)    d loss / d logits, in place
            grad_hidden[chunk] = logits @ weight            (c, D)
            grad_weight       += logits.T @ hidden[chunk]   (V, D)

Backward then only scales the kept gradients by the incoming gradient / the number of
counted targets. Same FLOPs as the plain way; with autograd off (evaluation) only the
first matmul runs.

Two sizes matter. A chunk (up to 256 MB of logits) is large so that the weight-gradient
matmul, which adds into the whole (V, D) gradient once per chunk, runs few times. The
softmax then walks the chunk in blocks: on a CPU, blocks of a few rows that fit in the
cache (a float32 copy of the block, torch's fused softmax kernel, the one-hot subtracted,
the result written back over the block's logits, so main memory is read about once); on
a GPU, where every kernel launch costs time, the whole chunk at once.

The weight arrives in its master dtype (float32 under autocast) and is cast here for the
matmuls, so its gradient is summed and returned in float32, never rounded to bf16. The
big buffers come from a `LossWorkspace`, which keeps them between calls on a CPU (a
fresh 100+ MB tensor each step costs a page fault per 4 KiB page when first written).
Tested equal to the plain loss, values and gradients, in tests/test_fused_loss.py.
"""

from __future__ import annotations

import math
import threading

import torch

CHUNK_BYTES = 256 << 20  # logits per matmul chunk, at most
CPU_BLOCK_BYTES = 8 << 20  # float32 logits per softmax block on a CPU


class LossWorkspace:
    """Big buffers of `linear_cross_entropy`, kept between calls on a CPU (CUDA's allocator already reuses memory).

    Each `GPT` owns one. A call `claim`s it for its duration; a call that finds it taken
    (another thread, or a loss inside a loss) gets a fresh, temporary workspace instead,
    so the loss is reentrant. Copying a model gives the copy a new, empty workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> LossWorkspace:
        return LossWorkspace()

    def claim(self) -> _Claim:
        return _Claim(self)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor of `shape`; on CPU a view of the largest buffer asked for under `name` so far."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        kept = self._buffers.get((name, dtype))
        if kept is None or kept.numel() < numel:
            kept = self._buffers[name, dtype] = torch.empty(numel, dtype=dtype)
        return kept[:numel].view(shape)


class _Claim:
    """`with workspace.claim() as buffers:` the workspace itself when free, else a temporary one."""

    def __init__(self, workspace: LossWorkspace) -> None:
        self.workspace = workspace
        self.owned = False

    def __enter__(self) -> LossWorkspace:
        self.owned = self.workspace._lock.acquire(blocking=False)
        return self.workspace if self.owned else LossWorkspace()

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.workspace._lock.release()


def chunk_loss_and_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, want_hidden_grad: bool,
    want_weight_grad: bool, chunk_rows: int, block_rows: int, buffers: LossWorkspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss over counted targets, their count, and (when wanted) the unscaled gradients.

    hidden (N, D) in the matmul dtype, weight (V, D) in its own (master) dtype, targets (N,)
    with -100 = ignore. The gradients are those of the *summed* loss: grad_hidden (N, D) in
    hidden's dtype, grad_weight (V, D) in weight's dtype.
    """
    want_grad = want_hidden_grad or want_weight_grad
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    matmul_weight = weight  # (V, D)
    if weight.dtype != hidden.dtype:
        matmul_weight = buffers.buffer("weight", weight.shape, hidden.dtype, device).copy_(weight)
    n_counted = (targets != -100).sum()
    total = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
    grad_weight = None  # (V, D) in the weight's dtype, summed over chunks
    logits_buffer = buffers.buffer("logits", (min(chunk_rows, n_rows), vocab), hidden.dtype, device)
    block_row_index = torch.arange(block_rows, device=device)  # 0..b-1, for the one-hot
    # float32 room for one block of logits (when they are bf16/fp16) and one of probabilities
    float_block = None
    if hidden.dtype != torch.float32:
        float_block = buffers.buffer("float block", (block_rows, vocab), torch.float32, device)
    probs_block = buffers.buffer("probabilities", (block_rows, vocab), torch.float32, device)
    for start in range(0, n_rows, chunk_rows):
        h = hidden[start:start + chunk_rows]  # (c, D)
        t = targets[start:start + chunk_rows]  # (c,)
        counted = (t != -100).float()  # (c,) 1 where the target counts
        safe_t = t.clamp(min=0)
        logits = torch.mm(h, matmul_weight.T, out=logits_buffer[:len(t)])  # (c, V)
        target_logit = logits.gather(1, safe_t[:, None]).squeeze(1).float()  # (c,)
        log_norm = torch.empty(len(t), dtype=torch.float32, device=device)  # (c,) log sum exp per row
        for row in range(0, len(t), block_rows):
            block = logits[row:row + block_rows]  # (b, V)
            block32 = block if float_block is None else float_block[:len(block)].copy_(block)  # (b, V) float32
            probs = probs_block[:len(block)]
            # One fused kernel (row max, exp and sum, scale) in place of five passes over the block.
            torch.ops.aten._softmax.out(block32, -1, False, out=probs)  # (b, V)
            # The top probability is exp(0) / sum, so log sum exp = row max - log(top
            # probability); it is at least 1/V, so the log never sees an underflow.
            log_norm[row:row + block_rows] = block32.amax(dim=-1) - probs.amax(dim=-1).log()
            if want_grad:
                # softmax minus one-hot, zero on ignored rows: the gradient of each counted row's loss
                probs.mul_(counted[row:row + block_rows, None])
                probs[block_row_index[:len(probs)], safe_t[row:row + block_rows]] -= counted[row:row + block_rows]
                block.copy_(probs)  # back into the chunk, for the matmuls below
        total += ((log_norm - target_logit) * counted).sum()
        if want_hidden_grad:
            torch.mm(logits, matmul_weight, out=grad_hidden[start:start + chunk_rows])  # (c, D)
        if want_weight_grad:
            grad_weight = _add_weight_gradient(grad_weight, logits, h, weight, buffers)
    return total, n_counted, grad_hidden, grad_weight


def _add_weight_gradient(
    grad_weight: torch.Tensor | None, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
    buffers: LossWorkspace,
) -> torch.Tensor:
    """grad_weight + grad_logits.T @ h (V, D), summed in the weight's dtype."""
    if h.dtype == weight.dtype:
        if grad_weight is None:
            return grad_logits.T @ h  # (V, D)
        return grad_weight.addmm_(grad_logits.T, h)  # accumulate inside the matmul, no temporary
    # A bf16/fp16 matmul cannot write a float32 sum: a product, then one cast or add.
    product = torch.mm(grad_logits.T, h, out=buffers.buffer("weight grad", weight.shape, h.dtype, h.device))
    if grad_weight is None:
        return product.to(weight.dtype)
    return grad_weight.add_(product)  # the default chunk size makes this rare


class _LinearCrossEntropy(torch.autograd.Function):
    """The autograd wrapper: forward computes loss and gradients, backward scales the gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                block_rows: int, workspace: LossWorkspace):
        with workspace.claim() as buffers:
            total, n_counted, grad_hidden, grad_weight = chunk_loss_and_gradients(
                hidden, weight, targets, want_hidden_grad=ctx.needs_input_grad[0],
                want_weight_grad=ctx.needs_input_grad[1], chunk_rows=chunk_rows, block_rows=block_rows,
                buffers=buffers)
        n = n_counted.clamp(min=1).to(torch.float32)
        # Kept on ctx, not saved for backward: backward scales them in place (no new
        # (V, D) tensor), which is only right once.
        ctx.grads = (grad_hidden, grad_weight, n)
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward can run only once per forward")
        grad_hidden, grad_weight, n = ctx.grads
        ctx.grads = None
        scale = grad_output / n  # a float32 0-d tensor: multiplying a bf16 gradient by it scales in float32
        if grad_hidden is not None:
            grad_hidden.mul_(scale)
        if grad_weight is not None:
            grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None


def default_sizes(n_rows: int, vocab: int, element_size: int, device: torch.device) -> tuple[int, int]:
    """(chunk_rows, block_rows): equal chunks of at most CHUNK_BYTES of logits (as few as fit: each adds one
    (V, D) matmul result into the weight gradient); softmax blocks of CPU_BLOCK_BYTES on a CPU, whole chunks
    elsewhere."""
    max_rows = max(16, CHUNK_BYTES // (element_size * vocab))
    n_chunks = max(1, math.ceil(n_rows / max_rows))
    chunk_rows = math.ceil(n_rows / n_chunks)
    block_rows = max(1, CPU_BLOCK_BYTES // (4 * vocab)) if device.type == "cpu" else chunk_rows
    return chunk_rows, block_rows


# Eager inside a compiled model (a graph break at the loss; the body still compiles whole):
# traced, the unrolled block loop made a CPU step slower than eager (BENCHMARKS.md).
@torch.compiler.disable
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace: LossWorkspace | None = None,
    chunk_rows: int | None = None, block_rows: int | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)` without the full logits tensor.

    hidden (N, D), weight (V, D), targets (N,). Under autocast the matmuls run in the
    autocast precision and the softmax in float32, as they would in the plain version.
    `workspace` keeps the big buffers between calls (a fresh one when None); `chunk_rows`
    and `block_rows` (rows per matmul chunk and per softmax block) default to
    `default_sizes`. With autograd off, or no input that requires a gradient, no
    gradient work is done.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    default_chunk, default_block = default_sizes(hidden.shape[0], weight.shape[0], hidden.element_size(), hidden.device)
    chunk_rows = chunk_rows or default_chunk
    block_rows = min(block_rows or default_block, chunk_rows)
    workspace = workspace or LossWorkspace()
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, block_rows, workspace)
        with workspace.claim() as buffers:
            total, n_counted, _, _ = chunk_loss_and_gradients(
                hidden, weight, targets, want_hidden_grad=False, want_weight_grad=False, chunk_rows=chunk_rows,
                block_rows=block_rows, buffers=buffers)
        return total / n_counted.clamp(min=1).to(torch.float32)
