"""Tests for gpt/optim.py: AdamW against torch.optim.AdamW, exact resume, the schedule, clipping.

The fused path's kernel is compiled once per process and dtype (seconds); the tests lower
`FUSED_MIN_ELEMENTS` so that the tiny tensors here go through it.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gpt.optim
from gpt.optim import AdamW, clip_grad_norm, lr_at, param_groups

VOCAB = 32
BASE_LR = 1e-2
SCHEDULE = dict(lr=BASE_LR, warmup_steps=10, max_steps=100, min_lr=1e-3)


class TinyLM(nn.Module):
    """A one-block language model: embeddings, pre-norm MLP with a residual, norm, head.

    `unused` never reaches the loss, so its gradient stays None.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        self.final_norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, VOCAB, bias=False)
        self.unused = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)  # (B, T, 16)
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.lm_head(self.final_norm(x))  # (B, T, VOCAB)


def make_model(dtype: torch.dtype = torch.float32) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(dtype)


@pytest.fixture
def fused_for_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send tensors of 64 elements and more through the fused kernel (TinyLM's matrices and its 64-wide bias)."""
    monkeypatch.setattr(gpt.optim, "FUSED_MIN_ELEMENTS", 64)


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """'torch' is the reference; 'loop', 'foreach' and 'fused' are our paths. One group decays, one does not."""
    groups = param_groups(model, weight_decay=0.1)
    if kind == "torch":
        return torch.optim.AdamW(groups, lr=BASE_LR, betas=(0.9, 0.95), foreach=False)
    return AdamW(groups, lr=BASE_LR, betas=(0.9, 0.95), foreach=kind == "foreach", fused=kind == "fused")


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Steps of next-token training on seeded random tokens, with the lr set from the schedule.

    Every third step the final norm's bias loses its gradient, so parameters end up with
    different step counts (and bias corrections).
    """
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, **SCHEDULE)
        generator = torch.Generator().manual_seed(step)
        ids = torch.randint(0, VOCAB, (4, 9), generator=generator)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if step % 3 == 0:
            model.final_norm.bias.grad = None
        optimizer.step()
        optimizer.zero_grad()


def max_abs_difference(model_a: nn.Module, model_b: nn.Module) -> float:
    return max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.usefixtures("fused_for_small_tensors")
@pytest.mark.parametrize("kind", ["loop", "foreach", "fused"])
@pytest.mark.parametrize(
    "dtype, tolerance",
    [pytest.param(torch.float32, 1e-6, id="float32"), pytest.param(torch.float64, 1e-13, id="float64")],
)
def test_adamw_follows_torch_adamw(kind: str, dtype: torch.dtype, tolerance: float) -> None:
    reference, ours = make_model(dtype), make_model(dtype)
    start = copy.deepcopy(reference)
    reference_optimizer = make_optimizer(reference, "torch")
    our_optimizer = make_optimizer(ours, kind)
    train(reference, reference_optimizer, range(100))
    train(ours, our_optimizer, range(100))

    assert max_abs_difference(reference, start) > 0.1  # the models did train
    assert max_abs_difference(reference, ours) <= tolerance
    # The parameter without a gradient was never touched and got no state.
    assert torch.equal(ours.unused.weight, start.unused.weight)
    assert ours.unused.weight not in our_optimizer.state
    # Skipped steps count like torch's.
    torch_steps = [int(s["step"]) for s in reference_optimizer.state.values()]
    assert [s["step"] for s in our_optimizer.state.values()] == torch_steps
    assert sorted(set(torch_steps)) == [66, 100]


@pytest.mark.parametrize("batch_bytes", [64, 1 << 20, 1 << 40])
def test_loop_and_foreach_paths_agree(monkeypatch: pytest.MonkeyPatch, batch_bytes: int) -> None:
    """Bit for bit on mixed dtypes, with CPU batches smaller than a tensor, at the default size, and whole."""
    monkeypatch.setattr(gpt.optim, "FOREACH_CPU_BATCH_BYTES", batch_bytes)
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), ()]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32]
    initial = [torch.randn(shape, generator=generator, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]
    # A transposed view is non-contiguous: the CPU batching must not slice it flat.
    initial.append(torch.randn(6, 9, generator=generator).t())
    loop_params = [nn.Parameter(t.clone()) for t in initial]
    foreach_params = [nn.Parameter(t.clone()) for t in initial]
    assert not loop_params[-1].is_contiguous() and not foreach_params[-1].is_contiguous()
    loop = AdamW([{"params": loop_params[:3]}, {"params": loop_params[3:], "weight_decay": 0}], foreach=False)
    foreach = AdamW([{"params": foreach_params[:3]}, {"params": foreach_params[3:], "weight_decay": 0}])

    for step in range(20):
        grads = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in initial]
        for optimizer, params in ((loop, loop_params), (foreach, foreach_params)):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            for param, grad in zip(params, grads):
                param.grad = None if (step % 4 == 1 and param.ndim == 1) else grad.clone()
            optimizer.step()

    for loop_param, foreach_param, start in zip(loop_params, foreach_params, initial):
        assert not torch.equal(loop_param, start)
        assert torch.equal(loop_param, foreach_param)


@pytest.mark.usefixtures("fused_for_small_tensors")
@pytest.mark.parametrize("kind", ["loop", "foreach", "fused"])
def test_state_dict_round_trip_resumes_bit_for_bit(kind: str) -> None:
    straight = make_model()
    straight_optimizer = make_optimizer(straight, kind)
    train(straight, straight_optimizer, range(100))

    first_half = make_model()
    first_half_optimizer = make_optimizer(first_half, kind)
    train(first_half, first_half_optimizer, range(50))
    buffer = io.BytesIO()
    torch.save({"model": first_half.state_dict(), "optimizer": first_half_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = TinyLM()  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = make_optimizer(resumed, kind)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, range(50, 100))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    straight_state = straight_optimizer.state_dict()["state"]
    resumed_state = resumed_optimizer.state_dict()["state"]
    assert straight_state.keys() == resumed_state.keys()
    for index, state in straight_state.items():
        assert state["step"] == resumed_state[index]["step"]
        assert torch.equal(state["exp_avg"], resumed_state[index]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], resumed_state[index]["exp_avg_sq"])


def test_fused_path_follows_the_loop(monkeypatch: pytest.MonkeyPatch, fused_for_small_tensors: None) -> None:
    """Through the kernel to float rounding, alone or gathered; a non-contiguous tensor (multi-tensor path) bit for bit."""
    kernel_sizes = []
    run_fused_kernel = gpt.optim._run_fused_kernel

    def spy(*args):
        kernel_sizes.append(args[0].numel())
        return run_fused_kernel(*args)

    monkeypatch.setattr(gpt.optim, "_run_fused_kernel", spy)
    generator = torch.Generator().manual_seed(0)
    shapes = [(30, 7), (300,), (5,), (3, 4), (64,)]
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    initial.append(torch.randn(20, 9, generator=generator).t())  # non-contiguous
    runs = {}
    for kind in ("loop", "fused"):
        params = [nn.Parameter(t.clone()) for t in initial]
        optimizer = AdamW(
            [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0}],
            betas=(0.9, 0.95), weight_decay=0.1, foreach=False, fused=kind == "fused",
        )
        for step in range(30):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            step_generator = torch.Generator().manual_seed(100 + step)
            for param in params:
                param.grad = torch.randn(param.shape, generator=step_generator)
                if step % 4 == 1 and param.ndim == 1:
                    param.grad = None
            optimizer.step()
        runs[kind] = params

    # 210, 300 and 64 elements alone; the (5,) and (3, 4) gathered (17), or apart when their steps differ.
    assert set(kernel_sizes) == {210, 300, 64, 17, 5, 12}
    for loop, fused, start in zip(runs["loop"], runs["fused"], initial):
        assert not torch.equal(loop, start)
        if fused.is_contiguous():
            # The loop's lerp (m) and addcmul (v) keep a product unrounded (a fused multiply-add)
            # and its sqrt is not always exact, the kernel rounds each operation: m and v may
            # differ by an ulp, the parameters (up to 3.4) by an ulp or two (6e-8 here) after 30
            # steps. A wrong term of the update (lr 1e-2 / step) would be 1e-4 off or more.
            torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fused, loop)


def test_fused_kernel_rounds_each_operation_once(fused_for_small_tensors: None) -> None:
    """On the CPU the kernel is IEEE float32 arithmetic of `_adamw_elementwise`, as numpy computes it: bit for bit.

    (Not as torch's eager ops compute it: their sqrt is not always correctly rounded.)
    """
    generator = torch.Generator().manual_seed(0)
    param, grad, exp_avg = (torch.randn(100_000, generator=generator) for _ in range(3))
    exp_avg_sq = torch.rand(100_000, generator=generator)
    values = [1 - 1e-3 * 0.1, 0.1, 0.95, 0.05, math.sqrt(1 - 0.95**3), 1e-8, -1e-3 / (1 - 0.9**3)]
    p, g, m, v = (t.numpy().copy() for t in (param, grad, exp_avg, exp_avg_sq))
    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size = np.float32(values)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    p = p * decay + neg_step_size * m / (np.sqrt(v) / bias_correction2_sqrt + eps)

    hyperparameters = gpt.optim._hyperparameters_tensor(values, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # as in AdamW.step: the kernel compiled there serves
        assert gpt.optim._run_fused_kernel(param, grad, exp_avg, exp_avg_sq, hyperparameters)
    assert p.dtype == np.float32
    np.testing.assert_array_equal(param.numpy(), p)
    np.testing.assert_array_equal(exp_avg.numpy(), m)
    np.testing.assert_array_equal(exp_avg_sq.numpy(), v)


def test_fused_path_falls_back_when_torch_compile_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No working compiler: one warning, then the multi-tensor path's results, step after step."""

    def compile_that_fails(function, **kwargs):
        def compiled(*args):
            raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    monkeypatch.setattr(gpt.optim, "_fused_kernel", None)
    monkeypatch.setattr(gpt.optim, "_fused_kernel_failed", False)
    monkeypatch.setattr(gpt.optim, "_fused_kernel_compiled_for", set())
    monkeypatch.setattr(gpt.optim, "FUSED_MIN_ELEMENTS", 2)
    generator = torch.Generator().manual_seed(0)
    initial = torch.randn(10, 3, generator=generator)
    fused_param, foreach_param = nn.Parameter(initial.clone()), nn.Parameter(initial.clone())
    fused, foreach = AdamW([fused_param], fused=True), AdamW([foreach_param], foreach=True)
    for step in range(3):
        grad = torch.randn(10, 3, generator=generator)
        fused_param.grad, foreach_param.grad = grad.clone(), grad.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused.step()
        messages = [str(w.message) for w in caught]
        if step == 0:
            assert len(messages) == 1 and "torch.compile failed" in messages[0] and "no C++ compiler" in messages[0]
        else:
            assert messages == []
        foreach.step()
        assert torch.equal(fused_param, foreach_param)
    assert not torch.equal(fused_param, initial)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_on_cuda_follows_the_loop_and_torch(dtype: torch.dtype) -> None:
    """On CUDA the kernel is Triton's: it follows the loop (float32) and torch's fused AdamW, without a host sync.

    Two tensors are over FUSED_MIN_ELEMENTS (the kernel), two under (the multi-tensor path).
    In bfloat16 the kernel, like torch's fused one, computes in float32 and rounds once per
    stored tensor, where the loop rounds after each op: it is compared with torch's, to
    within one bfloat16 rounding (2⁻⁷ of values in [1, 2)).
    """
    cuda = torch.device("cuda")
    shapes = [(300, 257), (70_000,), (17,), (64, 64)]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    runs = {}
    for name in ("fused", "loop", "torch"):
        torch.manual_seed(0)
        params = [torch.randn(shape, device=cuda, dtype=dtype, requires_grad=True) for shape in shapes]
        if name == "torch":
            optimizer = torch.optim.AdamW(params, **settings, fused=True)
        else:
            optimizer = AdamW(params, **settings, foreach=False, fused=name == "fused")
        for step in range(5):
            generator = torch.Generator(device=cuda).manual_seed(step)
            for param in params:
                param.grad = torch.randn(param.shape, device=cuda, dtype=dtype, generator=generator)
            # After the first step (which compiles) a step only queues kernels: no host sync.
            torch.cuda.set_sync_debug_mode("error" if name == "fused" and step > 0 else "default")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs[name] = [p.detach().float().cpu() for p in params]

    assert not gpt.optim._fused_kernel_failed
    for fused, loop, reference in zip(runs["fused"], runs["loop"], runs["torch"]):
        if dtype == torch.float32:
            # Fused multiply-adds round differently from the loop's op-by-op (see test_fused_path_follows_the_loop).
            torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(fused, reference, rtol=2**-7, atol=2**-7)


def test_adamw_rejects_bad_hyperparameters() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    for kwargs, name in [
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(foreach=True, fused=True), "foreach and fused"),
    ]:
        with pytest.raises(ValueError, match=name):
            AdamW(params, **kwargs)


def test_param_groups_decay_matrices_and_embeddings_only() -> None:
    model = make_model()
    model.lm_head.weight = model.tok_emb.weight  # tied: must appear once
    model.unused.requires_grad_(False)  # frozen: must not appear
    groups = param_groups(model, weight_decay=0.1)

    names = {id(p): name for name, p in model.named_parameters()}
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]
    assert [names[id(p)] for p in groups[0]["params"]] == ["tok_emb.weight", "up.weight", "down.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == [
        "norm.weight", "norm.bias", "up.bias", "down.bias", "final_norm.weight", "final_norm.bias",
    ]


def test_param_groups_drop_an_empty_group() -> None:
    groups = param_groups(nn.Linear(3, 2, bias=False), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


def test_cosine_schedule_values() -> None:
    kwargs = dict(lr=1e-3, warmup_steps=10, max_steps=110, min_lr=1e-4)
    # warmup: lr * (step + 1) / warmup_steps
    assert lr_at(0, **kwargs) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(4, **kwargs) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(9, **kwargs) == pytest.approx(1e-3, rel=1e-12)
    # decay: min_lr + (lr - min_lr) * (1 + cos(pi * (step - 10) / 100)) / 2
    assert lr_at(10, **kwargs) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(35, **kwargs) == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert lr_at(60, **kwargs) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr_at(85, **kwargs) == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(0.5)) / 2, rel=1e-12)
    assert lr_at(110, **kwargs) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(1000, **kwargs) == pytest.approx(1e-4, rel=1e-12)
    # no warmup: the first step already gets the full rate
    assert lr_at(0, lr=1e-3, warmup_steps=0, max_steps=10, min_lr=0.0) == 1e-3
    # a smoke run shorter than the warmup stays in the warmup
    assert lr_at(2, lr=1e-3, warmup_steps=100, max_steps=3, min_lr=0.0) == pytest.approx(3e-5, rel=1e-12)


def test_constant_schedule_values() -> None:
    kwargs = dict(lr=2e-3, warmup_steps=4, max_steps=10, min_lr=0.0, schedule="constant")
    assert [lr_at(step, **kwargs) for step in (0, 1, 3)] == pytest.approx([5e-4, 1e-3, 2e-3], rel=1e-12)
    assert [lr_at(step, **kwargs) for step in (4, 9, 10, 500)] == [2e-3] * 4


def test_schedule_rejects_bad_arguments() -> None:
    good = dict(lr=1e-3, warmup_steps=10, max_steps=100, min_lr=1e-4)
    for step, changes, name in [
        (-1, {}, "step"),
        (0, dict(lr=-1.0), "lr"),
        (0, dict(min_lr=2e-3), "min_lr"),
        (0, dict(warmup_steps=-1), "warmup_steps"),
        (0, dict(max_steps=-1), "max_steps"),
        (0, dict(schedule="linear"), "schedule"),
    ]:
        with pytest.raises(ValueError, match=name):
            lr_at(step, **{**good, **changes})


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm: float) -> None:
    """Clipping active (0.5) and inactive (1e6), on float32 and float64 gradients."""
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(8, 4), (4,), (3, 3)]]
    params.append(nn.Parameter(torch.zeros(5, dtype=torch.float64)))
    params.append(nn.Parameter(torch.zeros(2)))  # no gradient
    for param in params[:-1]:
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    for param, ours in zip(reference, params):
        param.grad = None if ours.grad is None else ours.grad.clone()

    norm = clip_grad_norm(params, max_norm)
    reference_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)

    assert norm.item() > 1.0
    assert torch.equal(norm, reference_norm)
    for ours, theirs in zip(params, reference):
        assert (ours.grad is None and theirs.grad is None) or torch.equal(ours.grad, theirs.grad)
    clipped_norm = math.sqrt(sum(p.grad.double().square().sum().item() for p in params[:-1]))
    assert clipped_norm == pytest.approx(min(max_norm, norm.item()), rel=1e-5)


def test_clip_grad_norm_returns_a_non_finite_norm() -> None:
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert torch.isinf(clip_grad_norm(param, 1.0))
