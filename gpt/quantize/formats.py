"""The two weight formats: int8 per output channel, and int4 in groups along the input.

A linear layer's weight W is (N, K): N outputs, K inputs. Quantizing it means storing
small integers plus a few float numbers from which W is approximately rebuilt.

int8, symmetric, one scale per output row (per channel):

    scale[n] = max_k |W[n, k]| / 127
    q[n, k]  = round(W[n, k] / scale[n])            in [-127, 127], stored as int8 (N, K)
    W[n, k] ~ q[n, k] * scale[n]

int4, in groups of G consecutive inputs (G = 32, 64, 128 or 256), each group with
its own scale and zero point (asymmetric: a group's 16 levels span its own [min, max]):

    lo, hi      = min and max of the group's weights
    scale[n, g] = (hi - lo) / 15
    q[n, k]     = round((W[n, k] - lo) / scale[n, g])   in [0, 15]
    zero[n, g]  = lo + 8 * scale[n, g]                   the value code 8 stands for
    W[n, k]    ~ (q[n, k] - 8) * scale[n, g] + zero[n, g]

Writing the zero point as "the value of code 8" is the convention of torch's int4 CPU
kernel (`_weight_int4pack_mm_for_cpu`); `symmetric=True` gives the zero-point-free
variant (zero = 0, 15 levels from -7 to 7 times max|w| / 7) for comparison.
Two int4 codes share a byte: column 2j in the low nibble, column 2j + 1 in the high one,
so the codes take (N, K / 2) bytes.

A layer whose inputs the requested group size does not divide takes the largest allowed
size below it that does (`layer_group_size`): asking SmolLM2 (576 = 9 x 64 inputs) for
groups of 128 gives 128 where the inputs allow it (1536) and 64 elsewhere.

Every function here is plain tensor code: it is also the reference the fast kernels
(gpt/quantize/cpu_kernels.py) are tested against.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (q (N, K) int8, scales (N,) float32), symmetric per output row."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,); an all-zero row keeps a tiny scale
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q (N, K) int8, scales (N,)) -> weight (N, K) float32."""
    return q.float() * scales[:, None].float()


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (codes (N, K/2) uint8, scales (N, K/G) float32, zeros (N, K/G) float32)."""
    rows, cols = weight.shape
    check_int4_shape(cols, group_size)
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)  # (N, K/G, G)
    if symmetric:
        scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7  # (N, K/G)
        zeros = torch.zeros_like(scales)
        q = torch.round(groups / scales[..., None]).clamp(-7, 7) + 8  # codes 1..15; 0 unused
    else:
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G) each
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        zeros = lo + 8 * scales
        q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(rows, cols).to(torch.uint8)), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(codes (N, K/2) uint8, scales (N, K/G), zeros (N, K/G)) -> weight (N, K) float32."""
    q = unpack_int4(codes).float()  # (N, K)
    rows, cols = q.shape
    groups = q.reshape(rows, scales.shape[1], -1)  # (N, K/G, G)
    weight = (groups - 8) * scales[..., None].float() + zeros[..., None].float()
    return weight.reshape(rows, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes (N, K) uint8 in [0, 15] -> (N, K/2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> codes (N, K) uint8 in [0, 15]; the inverse of `pack_int4`."""
    low, high = codes & 0x0F, codes >> 4
    return torch.stack([low, high], dim=-1).reshape(codes.shape[0], -1)  # (N, K/2, 2) -> (N, K)


def layer_group_size(in_features: int, requested: int) -> int:
    """The group size a layer of `in_features` inputs gets when `requested` is asked for: the largest of
    INT4_GROUP_SIZES up to `requested` that divides the inputs (SmolLM2's 576 = 9 x 64 takes 64 for 128).
    ValueError when none does (inputs not a multiple of 32)."""
    fitting = [size for size in INT4_GROUP_SIZES if size <= requested and in_features % size == 0]
    if not fitting:
        raise ValueError(f"no int4 group size up to {requested} divides the layer's {in_features} inputs")
    return max(fitting)


def check_int4_shape(in_features: int, group_size: int) -> None:
    """ValueError unless group_size is one of INT4_GROUP_SIZES and divides in_features."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the layer's {in_features} inputs")
