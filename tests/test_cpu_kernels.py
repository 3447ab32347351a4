"""The AVX2 int8/int4 kernels of gpt/quantize/cpu_kernels.py against a plain float64 reference.

The reference is written here, independently of the kernels: dequantize the weight with
torch ops, then `x @ w.T` in float64. The kernels sum float32 products in their own order,
so they may differ from it by float32 rounding. For a sum of K products computed in float32
in any order, the error is at most about K * eps * sum_k |x_k * t_k| (first order; eps =
2**-24 is float32's unit roundoff), where t_k is what the kernel actually multiplies x_k by:
for int8 the weight itself (its scale is applied after the sum), for int4 the raw code
q_k in 0..15 times the group scale, plus the group's (z - 8 s) times the group sum of x.
That bound, plus a float32 rounding of the result, is the tolerance of every comparison: a
wrong nibble, sign, scale or group is orders of magnitude above it.

Skipped only when `available()` is False (no AVX2/FMA, no compiler or ninja); the first test
may compile the kernels (about a minute, once per machine and torch version).
"""

from __future__ import annotations

import pytest
import torch

from gpt.quantize import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=cpu_kernels.why_unavailable())

EPS32 = 2.0 ** -24
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N, K) of SmolLM2-135M


def int8_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) float64 product and its float32 error bound, for x (M, K), qweight (N, K), scales (N,)."""
    weight = qweight.double() * scales.double()[:, None]  # (N, K)
    exact = x.double() @ weight.T
    magnitude = x.double().abs() @ weight.abs().T  # sum_k |x_k w_k|
    return exact, (x.shape[1] + 2) * EPS32 * magnitude


def int4_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) float64 product and its float32 error bound, for the int4 format of cpu_kernels.int4_matmul."""
    n, half = codes.shape
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(n, 2 * half).double()  # (N, K): low nibble first
    s = scales.double().repeat_interleave(group_size, dim=1)  # (N, K)
    z = zeros.double().repeat_interleave(group_size, dim=1)
    weight = (q - 8) * s + z
    exact = x.double() @ weight.T
    magnitude = x.double().abs() @ (q * s.abs() + (z - 8 * s).abs()).T
    return exact, (x.shape[1] + 2) * EPS32 * magnitude


def assert_within(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == exact.shape
    error = (out.double() - exact).abs()
    worst = (error / (bound + 1e-30)).max().item()
    assert worst <= 1.0, f"error reaches {worst:.2f} x the float32 bound (max abs error {error.max().item():.3g})"


def random_int8(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = torch.rand(n, generator=generator) * 0.01 + 1e-4
    return qweight, scales


def random_int4(n: int, k: int, group_size: int, generator: torch.Generator):
    codes = torch.randint(0, 256, (n, k // 2), generator=generator, dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=generator) * 0.01 + 1e-4
    zeros = torch.randn(n, k // group_size, generator=generator) * 0.01
    return codes, scales, zeros


@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES)
def test_int8_smollm2_shapes(n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(8, k, generator=generator)
    qweight, scales = random_int8(n, k, generator)
    exact, bound = int8_reference(x, qweight, scales)
    for rows in (1, 3, 8):  # one decoding row, and a few
        assert_within(cpu_kernels.int8_matmul(x[:rows], qweight, scales), exact[:rows], bound[:rows])


@pytest.mark.parametrize("k", [1, 7, 31, 33, 63, 100, 577])
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 20])
def test_int8_odd_widths_and_row_counts(k: int, rows: int) -> None:
    """K % 32 tails (summed scalar) and M not a multiple of 4 (the kernel takes x rows in blocks of 4)."""
    generator = torch.Generator().manual_seed(k * 31 + rows)
    x = torch.randn(rows, k, generator=generator)
    qweight, scales = random_int8(37, k, generator)
    assert_within(cpu_kernels.int8_matmul(x, qweight, scales), *int8_reference(x, qweight, scales))


def test_int8_extreme_values() -> None:
    generator = torch.Generator().manual_seed(0)
    k = 96 + 5
    qweight = torch.where(torch.rand(64, k, generator=generator) < 0.5, 127, -127).to(torch.int8)
    qweight[0] = 127
    qweight[1] = -127
    qweight[2] = -128  # outside symmetric quantization's range, but a valid int8: still exact
    scales = torch.full((64,), 3.0)
    x = torch.randn(2, k, generator=generator) * 100
    assert_within(cpu_kernels.int8_matmul(x, qweight, scales), *int8_reference(x, qweight, scales))


@pytest.mark.parametrize("group_size", [32, 64])  # 576 is 4.5 x 128: no g128 for K = 576
@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES)
def test_int4_smollm2_shapes(n: int, k: int, group_size: int) -> None:
    generator = torch.Generator().manual_seed(n * 5 + k + group_size)
    x = torch.randn(8, k, generator=generator)
    codes, scales, zeros = random_int4(n, k, group_size, generator)
    exact, bound = int4_reference(x, codes, scales, zeros, group_size)
    for rows in (1, 3, 8):
        out = cpu_kernels.int4_matmul(x[:rows], codes, scales, zeros, group_size)
        assert_within(out, exact[:rows], bound[:rows])


@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_int4_group_sizes(group_size: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(group_size + rows)
    k = 768  # a multiple of every group size: 3 groups of 256, 48 of 16
    x = torch.randn(rows, k, generator=generator)
    codes, scales, zeros = random_int4(45, k, group_size, generator)
    out = cpu_kernels.int4_matmul(x, codes, scales, zeros, group_size)
    assert_within(out, *int4_reference(x, codes, scales, zeros, group_size))


def test_int4_extreme_codes_and_nibble_order() -> None:
    """Codes 0 and 15, and rows whose low and high nibbles differ, so a swapped nibble order fails."""
    k, group_size = 128, 32
    codes = torch.zeros(6, k // 2, dtype=torch.uint8)
    codes[1] = 0xFF  # every q = 15
    codes[2] = 0x0F  # even k: 15, odd k: 0
    codes[3] = 0xF0  # even k: 0, odd k: 15
    codes[4] = torch.arange(k // 2, dtype=torch.uint8) % 16  # even k: j % 16, odd k: 0
    codes[5] = (torch.arange(k // 2, dtype=torch.uint8) % 16) << 4
    scales = torch.linspace(0.5, 2.0, 6 * (k // group_size)).reshape(6, -1)
    zeros = torch.linspace(-1.0, 1.0, 6 * (k // group_size)).reshape(6, -1)
    x = torch.arange(1, 3 * k + 1, dtype=torch.float32).reshape(3, k) / k  # positions matter
    out = cpu_kernels.int4_matmul(x, codes, scales, zeros, group_size)
    assert_within(out, *int4_reference(x, codes, scales, zeros, group_size))


def test_non_contiguous_activations_are_handled() -> None:
    generator = torch.Generator().manual_seed(1)
    k = 256
    x = torch.randn(k, 4, generator=generator).T  # (4, K), stride (1, 4)
    assert not x.is_contiguous()
    qweight, scales = random_int8(50, k, generator)
    assert_within(cpu_kernels.int8_matmul(x, qweight, scales), *int8_reference(x, qweight, scales))
    codes, scales4, zeros = random_int4(50, k, 64, generator)
    out = cpu_kernels.int4_matmul(x[:, :], codes, scales4, zeros, 64)
    assert_within(out, *int4_reference(x, codes, scales4, zeros, 64))


def test_non_contiguous_weights_are_rejected_clearly() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, generator=generator)
    qweight, scales = random_int8(64, 64, generator)
    with pytest.raises(RuntimeError, match="qweight must be contiguous"):
        cpu_kernels.int8_matmul(x, qweight.T, scales)
    codes, scales4, zeros = random_int4(8, 64, 32, generator)
    wide = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="codes must be contiguous"):
        cpu_kernels.int4_matmul(x, wide[:, ::2], scales4, zeros, 32)


def test_bad_shapes_and_types_are_rejected() -> None:
    x = torch.randn(2, 64)
    qweight, scales = random_int8(8, 64, torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        cpu_kernels.int8_matmul(x.double(), qweight, scales)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.int8_matmul(torch.randn(2, 65), qweight, scales)
    with pytest.raises(RuntimeError, match="scales has"):
        cpu_kernels.int8_matmul(x, qweight, scales[:4])
    codes, scales4, zeros = random_int4(8, 64, 32, torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match="not a multiple of group_size"):
        cpu_kernels.int4_matmul(torch.randn(2, 48), codes[:, :24].contiguous(), scales4, zeros, 32)
    with pytest.raises(RuntimeError, match="group_size must be"):
        cpu_kernels.int4_matmul(x, codes, scales4, zeros, 24)
    with pytest.raises(RuntimeError, match="zeros is"):
        cpu_kernels.int4_matmul(x, codes, scales4, zeros[:, :1].contiguous(), 32)


def test_empty_inputs() -> None:
    qweight, scales = random_int8(8, 64, torch.Generator().manual_seed(5))
    assert cpu_kernels.int8_matmul(torch.randn(0, 64), qweight, scales).shape == (0, 8)


def test_threads_give_the_same_result() -> None:
    """Rows are split over threads but each output is summed by one thread: identical bits at 1 and 2 threads."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 576, generator=generator)
    qweight, scales = random_int8(1536, 576, generator)
    codes, scales4, zeros = random_int4(1536, 576, 32, generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (cpu_kernels.int8_matmul(x, qweight, scales), cpu_kernels.int4_matmul(x, codes, scales4, zeros, 32))
        torch.set_num_threads(2)
        two = (cpu_kernels.int8_matmul(x, qweight, scales), cpu_kernels.int4_matmul(x, codes, scales4, zeros, 32))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
