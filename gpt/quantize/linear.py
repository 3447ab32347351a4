"""`Int8Linear` and `Int4Linear`: a frozen linear layer whose weight is stored quantized.

They replace `nn.Linear` layers of a trained model (`gpt/quantize/model.py`) and compute
y = x W^T + b with W rebuilt from its integer codes (the formats: gpt/quantize/formats.py).
Two ways to compute the product, tested equal in tests/test_quantize.py:

* the reference: dequantize W to float, then an ordinary matmul. Plain, works on any
  device and dtype, and is what prefill and batches use (they are bound by arithmetic,
  where the float matmul is fastest);
* the fast path, for the few rows of a decoding step on a CPU: hand-written kernels
  (gpt/quantize/cpu_kernels.py) that read the integer codes straight from memory and
  never build the float weight. Decoding one token streams every weight once, so
  reading 1 byte (int8) or half a byte (int4) per weight instead of 4 is the speed-up.

Training through a quantized layer (LoRA on a frozen quantized base, QLoRA-style) goes
through `QuantizedProduct`, whose backward rebuilds W for the input's gradient instead
of keeping the float weight alive between forward and backward: the base then costs
its quantized size in memory during fine-tuning, not its float size. The weight itself
never gets a gradient (it is codes, not parameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..linear import Linear
from . import cpu_kernels, formats

# Decoding steps have one row per sequence; beyond this many rows the float matmul wins.
FAST_PATH_MAX_ROWS = 8


class QuantizedLinear(nn.Module):
    """What both formats share: shapes, an optional float bias, and the choice of path."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.use_fast_path = True  # tests turn it off to compare the two paths

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K) the codes stand for."""
        raise NotImplementedError

    def fast_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (M, K) float32 on CPU -> (M, N) through the kernels, or None when they are unavailable."""
        raise NotImplementedError

    def reference_product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N): dequantize, then an ordinary matmul in x's dtype."""
        return F.linear(x, self.dequantize().to(x.dtype))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias, by the fast path when it applies."""
        rows = x.numel() // x.shape[-1]
        if (self.use_fast_path and rows <= FAST_PATH_MAX_ROWS and x.device.type == "cpu"
                and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            out = self.fast_product(x.reshape(rows, -1).contiguous())  # (M, N)
            if out is not None:
                return out.view(*x.shape[:-1], self.out_features)
        return self.reference_product(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = QuantizedProduct.apply(x, self) if x.requires_grad else self.product(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @torch.no_grad()
    def to_float_linear(self) -> Linear:
        """A frozen float32 `Linear` with the dequantized weight (and the bias): what this layer computes."""
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.scales.device)
        linear.weight.copy_(self.dequantize())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


class QuantizedProduct(torch.autograd.Function):
    """y = x W^T for a quantized W, differentiable in x only; W is rebuilt in backward, not saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dequantize().to(grad_out.dtype)  # (N, K)
        return grad_out @ weight, None  # (..., N) @ (N, K) -> (..., K)


class Int8Linear(QuantizedLinear):
    """Weight as int8 codes (N, K) and one float32 scale per output row (N,)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*formats.quantize_int8(linear.weight), linear.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8Linear:
        """A layer of this shape with zero codes, for loading a state_dict into."""
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features),
                   torch.zeros(out_features) if bias else None)

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize_int8(self.qweight, self.scales)

    def fast_product(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_kernels.int8_matmul(x, self.qweight, self.scales) if cpu_kernels.available() else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(QuantizedLinear):
    """Weight as int4 codes packed two per byte (N, K/2), with a float32 scale and zero point per group (N, K/G)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(codes.shape[1] * 2, codes.shape[0], bias)
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False) -> Int4Linear:
        return cls(*formats.quantize_int4(linear.weight, group_size, symmetric), linear.bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, group_size: int) -> Int4Linear:
        """A layer of this shape with zero codes, for loading a state_dict into."""
        formats.check_int4_shape(in_features, group_size)
        groups = in_features // group_size
        return cls(torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                   torch.ones(out_features, groups), torch.zeros(out_features, groups),
                   torch.zeros(out_features) if bias else None)

    def dequantize(self) -> torch.Tensor:
        return formats.dequantize_int4(self.codes, self.scales, self.zeros)

    def fast_product(self, x: torch.Tensor) -> torch.Tensor | None:
        if not cpu_kernels.available():
            return None
        return cpu_kernels.int4_matmul(x, self.codes, self.scales, self.zeros, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"
