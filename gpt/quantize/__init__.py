"""Weight-only quantization: int8 per output channel, int4 in groups, for smaller and faster-decoding models.

    from gpt.quantize import parse_scheme, quantize_model
    quantize_model(model, parse_scheme("int4:32"))   # block projections + LM head, in place

The modules, in reading order: `formats` (the arithmetic of both formats), `linear`
(the quantized layers, their reference and fast paths, and training through them),
`cpu_kernels` (the hand-written CPU kernels of the fast path), `model` (which layers
of a model, and its weight memory), `folder` (the on-disk form every verb loads) and
`cli` (`python -m gpt quantize`).
"""

from .linear import Int4Linear, Int8Linear, QuantizedLinear
from .model import QuantScheme, dequantize_model, is_quantized, parse_scheme, quantize_model, weight_bytes

__all__ = ["Int4Linear", "Int8Linear", "QuantizedLinear", "QuantScheme", "dequantize_model", "is_quantized",
           "parse_scheme", "quantize_model", "weight_bytes"]
