"""Quantizing a model: which layers, in which format, and how much memory the weights then take.

`quantize_model(model, scheme)` swaps, in place, every projection of every block (the
attention's q/k/v/out, the MLP's gate/up/down) and, unless told otherwise, the LM head
for `Int8Linear` / `Int4Linear`. The token (and position) embeddings stay in float:
a lookup reads one row per token, so they cost memory but not decoding speed. A tied
head gets its own quantized copy, and the embedding keeps the float matrix.

A scheme is written as `int8`, `int4` (groups of `DEFAULT_GROUP_SIZE`) or `int4:G`
(groups of G inputs) on every command line that takes one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from ..errors import UserError
from ..model import GPT
from . import formats
from .linear import Int4Linear, Int8Linear, QuantizedLinear

FORMATS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize: the format, the int4 group size, and whether int4 groups have zero points."""

    format: str
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only
    symmetric: bool = False  # int4 only: True drops the zero points

    def __str__(self) -> str:
        if self.format == "int8":
            return "int8"
        return f"int4:{self.group_size}" + (":symmetric" if self.symmetric else "")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def parse_scheme(spec: str, where: str = "--quantize") -> QuantScheme:
    """"int8" | "int4" | "int4:G" (| "int4:G:symmetric") -> QuantScheme; UserError naming `where` otherwise."""
    parts = spec.strip().lower().split(":")
    expected = f"int8, int4 or int4:G with G in {', '.join(map(str, formats.INT4_GROUP_SIZES))}"
    if parts[0] == "int8" and len(parts) == 1:
        return QuantScheme("int8")
    if parts[0] != "int4" or len(parts) > 3 or (len(parts) == 3 and parts[2] != "symmetric"):
        raise UserError(f"{where}: expected {expected}; got {spec!r}")
    group_size = DEFAULT_GROUP_SIZE
    if len(parts) >= 2:
        if not parts[1].isdigit() or int(parts[1]) not in formats.INT4_GROUP_SIZES:
            raise UserError(f"{where}: expected {expected}; got {spec!r}")
        group_size = int(parts[1])
    return QuantScheme("int4", group_size, symmetric=len(parts) == 3)


def quantize_model(model: GPT, scheme: QuantScheme, include_head: bool = True) -> GPT:
    """Replace the model's block projections (and its LM head, with `include_head`) by quantized layers, in place.

    With int4, a layer whose inputs `scheme.group_size` does not divide takes the largest
    smaller group size that does (`formats.layer_group_size`). Raises UserError when a
    layer's inputs are not a multiple of 32 (int4), or the model is already quantized.
    Returns the model.
    """
    if is_quantized(model):
        raise UserError("this model is already quantized")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if name in BLOCK_PROJECTIONS and isinstance(child, nn.Linear)]
    if include_head and isinstance(model.lm_head, nn.Linear):
        targets.append((model, "lm_head", model.lm_head))
    for _, name, linear in targets:
        if scheme.format == "int4" and linear.in_features % formats.INT4_GROUP_SIZES[0]:
            raise UserError(f"int4 needs layers whose inputs are a multiple of {formats.INT4_GROUP_SIZES[0]}; "
                            f"{name} has {linear.in_features}")
    for parent, name, linear in targets:
        setattr(parent, name, quantized_copy(linear, scheme))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a float32 `Linear` holding its dequantized weight, in place.

    After QLoRA-style fine-tuning this makes the final checkpoint an ordinary float model
    that every loader reads; the weights are exactly what the quantized layers computed with.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, child.to_float_linear())
    return model


def quantized_copy(linear: nn.Linear, scheme: QuantScheme) -> QuantizedLinear:
    """The quantized form of one linear layer, on the layer's device."""
    if scheme.format == "int8":
        layer: QuantizedLinear = Int8Linear.from_linear(linear)
    else:
        group_size = formats.layer_group_size(linear.in_features, scheme.group_size)
        layer = Int4Linear.from_linear(linear, group_size, scheme.symmetric)
    return layer.to(linear.weight.device)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, QuantizedLinear) for module in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: float parameters and buffers, quantized codes, scales, zero points.

    A tensor shared by two modules (a tied head) counts once; the RoPE tables do not count.
    """
    seen: set[int] = set()
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.data_ptr() in seen or name.rsplit(".", 1)[-1] in ("rope_cos", "rope_sin"):
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
