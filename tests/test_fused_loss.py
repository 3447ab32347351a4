"""The fused head + loss (gpt.fused_loss) against the plain cross-entropy of the full logits."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt.config import ModelConfig
from gpt.fused_loss import LossWorkspace, default_sizes, linear_cross_entropy
from gpt.model import GPT

FP32 = dict(atol=1e-6, rtol=1e-5)
BF16 = dict(atol=2e-3, rtol=2e-2)


def small_model(**overrides) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(vocab_size=97, context_length=32, d_model=48, n_layer=2, n_head=6), **overrides})
    return GPT(config).train()


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_the_plain_loss_of_the_model_with_gradients(tie):
    """loss_impl "fused" and "plain" (F.cross_entropy of the logits) give the same loss and gradients."""
    fused_model = small_model(tie_embeddings=tie, loss_impl="fused")
    plain_model = small_model(tie_embeddings=tie, loss_impl="plain")
    plain_model.load_state_dict(fused_model.state_dict())
    ids, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    targets[0, :7] = -100  # ignored positions (e.g. a masked prompt)
    plain = plain_model(ids, targets=targets)
    plain.backward()
    reference = F.cross_entropy(plain_model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(plain, reference)  # the plain branch is what it says
    fused = fused_model(ids, targets=targets)
    fused.backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    plain_grads = dict(plain_model.named_parameters())
    for name, p in fused_model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk_rows, block_rows", [(16, 5), (16, 16), (61, 61), (200, 7)])
def test_chunks_and_blocks_equal_cross_entropy(precision, chunk_rows, block_rows):
    """Several matmul chunks and softmax blocks (the CPU layout), whole-chunk blocks (the GPU layout),
    short last pieces and ignored rows: the loss and both gradients equal the plain ones."""
    torch.manual_seed(0)
    hidden = torch.randn(61, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (61,))
    targets[::5] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        reference = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    expected = torch.autograd.grad(reference, (hidden, weight))
    with autocast:
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, block_rows=block_rows)
    got = torch.autograd.grad(fused, (hidden, weight))
    tolerance = FP32 if precision == "fp32" else BF16
    torch.testing.assert_close(fused, reference, **tolerance)
    for name, g, e in zip(("hidden", "weight"), got, expected):
        assert g.dtype == e.dtype == torch.float32, name  # the weight gradient stays in the master dtype
        torch.testing.assert_close(g, e, **tolerance, msg=name)


def test_the_workspace_is_reused_across_sizes_and_dtypes():
    """One workspace grows and shrinks with the call: results match a fresh reference every time."""
    torch.manual_seed(1)
    weight = torch.randn(53, 16, requires_grad=True)
    workspace = LossWorkspace()
    for rows, precision in [(40, "fp32"), (7, "bf16"), (90, "bf16"), (3, "fp32"), (90, "fp32")]:
        hidden = torch.randn(rows, 16, requires_grad=True)
        targets = torch.randint(0, 53, (rows,))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            reference = F.cross_entropy((hidden @ weight.T).float(), targets)
            fused = linear_cross_entropy(hidden, weight, targets, workspace, chunk_rows=32, block_rows=6)
        tolerance = FP32 if precision == "fp32" else BF16
        torch.testing.assert_close(fused, reference, **tolerance)
        expected = torch.autograd.grad(reference, (hidden, weight))
        got = torch.autograd.grad(fused, (hidden, weight))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tolerance)


def test_bf16_gradients_are_scaled_in_float32():
    """Backward divides the kept gradients by the number of counted targets. With 1020 of them, 1/1020 in bf16
    is 0.39% off, so the division must happen in float32, rounded to bf16 once. The same 1024 rows once with
    the last 4 targets ignored (n = 1020) and once all counted (n = 1024, an exact power of two): the first
    1020 rows' unscaled bf16 gradients are the same, so the n = 1020 gradient must be exactly
    bf16(float32(unscaled) / 1020)."""
    torch.manual_seed(0)
    hidden = torch.randn(1024, 20, requires_grad=True)
    weight = torch.randn(30, 20)
    all_counted = torch.randint(0, 30, (1024,))
    last_ignored = all_counted.clone()
    last_ignored[1020:] = -100
    grads = []
    for targets in (last_ignored, all_counted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets)
        grads.append(torch.autograd.grad(loss, hidden)[0][:1020])
    unscaled = grads[1] * 1024  # exact: a power of two (the gradient is bf16 inside, float32 once back at hidden)
    assert torch.equal(grads[0], (unscaled * (torch.tensor(1.0) / 1020)).to(torch.bfloat16).float())


def test_backward_twice_is_an_error():
    """Backward scales the kept gradients in place, so a second pass would silently double-scale them."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 11, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products torch runs inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_with_autograd_off():
    """Under no_grad only the logits matmul runs, once per chunk (with gradients: three per chunk)."""
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (40,))
    with torch.no_grad(), CountMatmuls() as without_grad:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=20)
    assert without_grad.count == 2
    assert not loss.requires_grad
    with CountMatmuls() as with_grad:
        linear_cross_entropy(hidden, weight, targets, chunk_rows=20)
    assert with_grad.count == 6
    torch.testing.assert_close(loss, F.cross_entropy(hidden.detach() @ weight.detach().T, targets))


def test_reentrant_calls_share_no_buffers():
    """Two threads on one workspace at once, and a loss computed inside another loss's claim, give exact results."""
    workspace = LossWorkspace()
    torch.manual_seed(2)
    problems = [(torch.randn(300, 16), torch.randn(50, 16), torch.randint(0, 50, (300,))) for _ in range(4)]
    expected = [F.cross_entropy(h @ w.T, t) for h, w, t in problems]
    results: dict[int, list[torch.Tensor]] = {}

    def work(index: int) -> None:
        h, w, t = problems[index]
        results[index] = [linear_cross_entropy(h, w, t, workspace, chunk_rows=64, block_rows=3) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, losses in results.items():
        for loss in losses:
            torch.testing.assert_close(loss, expected[index], **FP32)
    with workspace.claim() as held:  # the workspace is taken: a call now gets a temporary one
        assert held is workspace
        h, w, t = problems[0]
        torch.testing.assert_close(linear_cross_entropy(h, w, t, workspace, chunk_rows=64), expected[0], **FP32)
        assert workspace.claim().__enter__() is not workspace


def test_block_sizes_are_chosen_per_device():
    """CPU: softmax blocks of a few rows (cache-sized); elsewhere one block per chunk (few kernel launches)."""
    rows, vocab = 16 * 1024, 50257
    chunk_cpu, block_cpu = default_sizes(rows, vocab, 2, torch.device("cpu"))
    chunk_gpu, block_gpu = default_sizes(rows, vocab, 2, torch.device("cuda"))
    max_chunk_rows = (256 << 20) // (2 * vocab)
    assert chunk_cpu == chunk_gpu <= max_chunk_rows
    assert chunk_cpu * -(-rows // chunk_cpu) >= rows  # the chunks cover every row
    assert block_cpu == (8 << 20) // (4 * vocab) and block_gpu == chunk_gpu
