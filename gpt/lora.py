"""LoRA: fine-tune a large frozen model by training small low-rank updates.

A frozen linear layer y = W x + b (W is out x in) gets a trainable update of rank r:

    y = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r)

A starts random and B starts at zero, so at the start the wrapped model computes
exactly what the base model does; training moves only A and B, r * (in + out)
numbers per layer instead of in * out.

The life of an adapter:

    names = apply_lora(model, rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    model.classifier_head.requires_grad_(True)     # anything else to train, unfrozen after apply_lora
    ... train ...
    merge_lora(model)                              # W += (alpha / r) * B A; the original linear layers again

While adapters are in place, a wrapped layer's frozen weight is reachable as
`<layer>.base.weight` (state_dict key e.g. `blocks.0.attn.q_proj.base.weight`) and
its adapter as `<layer>.lora_A` / `<layer>.lora_B`. After `merge_lora` the
state_dict has the base model's original keys (`blocks.0.attn.q_proj.weight`), so
checkpoints and exports need no LoRA code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from .config import LORA_TARGETS
from .errors import UserError
from .quantize.linear import QuantizedLinear

# The attribute names of the model's linear layers that can take an adapter.
VALID_TARGETS = LORA_TARGETS


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`self.base`) plus a trainable low-rank update `lora_B @ lora_A`.

    forward(x) = base(x) + dropout(x) @ lora_A^T @ lora_B^T * (alpha / rank).
    Dropout touches only the adapter's input, never the base path.
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        # A quantized base has no float weight: its adapters live in float32 beside its codes.
        like = base.weight if isinstance(base, nn.Linear) else base.scales
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=like.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=like.device, dtype=dtype))
        # The same uniform bound nn.Linear uses for its own weight; B = 0 keeps the update zero at the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = self.lora_dropout(x) @ self.lora_A.t()  # (..., r)
        update = low_rank @ self.lora_B.t()  # (..., out)
        return self.base(x) + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, computed in float32 and returned in the base weight's dtype (out, in);
        a quantized base's W is its dequantized weight, and the result stays float32."""
        delta = self.lora_B.float() @ self.lora_A.float()  # (out, in)
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantize() + delta * self.scaling
        return (self.base.weight.float() + delta * self.scaling).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Iterable[str] = ("q_proj", "v_proj"),
) -> list[str]:
    """Wrap every `nn.Linear` whose attribute name is in `targets` with a `LoRALinear`, in place.

    Every parameter of the model other than the new adapters is frozen
    (requires_grad False); to train more (a new classification head, say), set
    requires_grad on those modules after this call. Returns the dotted names of
    the wrapped layers, e.g. ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", ...].

    Raises UserError for a target name outside VALID_TARGETS, a target that
    matches no layer of this model (gate_proj in a GELU model), a model that
    already has adapters, or a non-positive rank or alpha or a dropout outside [0, 1).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise UserError(f"lora targets: empty; choose from {', '.join(VALID_TARGETS)}")
    unknown = [name for name in targets if name not in VALID_TARGETS]
    if unknown:
        raise UserError(
            f"lora targets: unknown name(s) {', '.join(map(repr, unknown))}; valid: {', '.join(VALID_TARGETS)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"lora rank: must be a positive integer, got {rank!r}")
    if not _is_number(alpha) or not alpha > 0:
        raise UserError(f"lora alpha: must be positive, got {alpha!r}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise UserError(f"lora dropout: must be in [0, 1), got {dropout!r}")
    if _lora_layers(model):
        raise UserError("model already has LoRA adapters; call merge_lora(model) before applying new ones")

    # Collect first, then replace, so the module tree is not changed while it is walked.
    found: list[tuple[str, nn.Module, str]] = []  # (dotted name, parent module, attribute name)
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in targets and isinstance(child, (nn.Linear, QuantizedLinear)):
                found.append((f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name))
    missing = [name for name in targets if all(attr != name for _, _, attr in found)]
    if missing:
        raise UserError(f"lora targets: {', '.join(map(repr, missing))} match no linear layer in this model")

    model.requires_grad_(False)
    for _, parent, attr in found:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return [name for name, _, _ in found]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += (alpha / r) * B A) and put the original linear layer back.

    The model's state_dict then has its original keys again. Each layer's
    requires_grad flags stay as they were (frozen, after apply_lora).
    A quantized base (QLoRA-style fine-tuning) cannot take the update in its codes: it
    becomes a float32 `Linear` holding dequantized W + (alpha / r) * B A, so the merged
    model is a float model (`python -m gpt quantize` makes it small again).
    Raises UserError when the model has no adapters.
    """
    layers = _lora_layers(model)
    if not layers:
        raise UserError("model has no LoRA adapters to merge")
    for parent, attr, lora in layers:
        base = lora.base.to_float_linear() if isinstance(lora.base, QuantizedLinear) else lora.base
        base.weight.copy_(lora.merged_weight())
        setattr(parent, attr, base)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`...lora_A`, `...lora_B`) of the model's state_dict, under their full keys."""
    return {key: tensor for key, tensor in model.state_dict().items() if key.endswith((".lora_A", ".lora_B"))}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by two modules (a tied head) counts once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    """Every LoRALinear in the model as (parent module, attribute name, layer)."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]
