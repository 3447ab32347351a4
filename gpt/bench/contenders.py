"""What the bench compares: the configs, the contenders, and building each one ready to train.

A contender is one implementation (ours or transformers'), in one architecture family
(GPT-2 or Llama). Every transformers contender is loaded from the export of our model of
its family with the same seed, so each pair starts from the same weights; each gets the
optimizer a user of its library would pick, and computes its loss its library's way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..model import GPT
from ..optim import AdamW, param_groups
from ..weights import save_pretrained

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> mean next-token loss


@dataclass(frozen=True)
class BenchConfig:
    """The shape of one benchmarked model and its training batch."""

    n_layer: int
    n_head: int
    d_model: int
    context_length: int
    batch_size_cpu: int
    batch_size_cuda: int
    vocab_size: int = 50257  # GPT-2's

    def batch_size(self, device: torch.device) -> int:
        return self.batch_size_cuda if device.type == "cuda" else self.batch_size_cpu

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of 64 (50257 -> 50304)."""
        return math.ceil(self.vocab_size / 64) * 64


BENCH_CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(n_layer=4, n_head=4, d_model=256, context_length=256, batch_size_cpu=8, batch_size_cuda=8),
    "small": BenchConfig(n_layer=6, n_head=6, d_model=384, context_length=256, batch_size_cpu=8, batch_size_cuda=8),
    "gpt2-124m": BenchConfig(
        n_layer=12, n_head=12, d_model=768, context_length=1024, batch_size_cpu=1, batch_size_cuda=16
    ),
}


@dataclass(frozen=True)
class Contender:
    """One implementation that is timed: whose code, which architecture, which vocabulary."""

    name: str
    family: str  # "gpt2" | "llama": the architecture, and which transformers class is the reference
    library: str  # "ours" | "transformers"
    padded_vocab: bool = False


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("ours", "gpt2", "ours"),
        Contender("ours-pad64", "gpt2", "ours", padded_vocab=True),
        Contender("hf-gpt2", "gpt2", "transformers"),
        Contender("ours-llama", "llama", "ours"),
        Contender("hf-llama", "llama", "transformers"),
    )
}
# Each of ours -> the transformers contender it is measured against.
REFERENCE = {"ours": "hf-gpt2", "ours-pad64": "hf-gpt2", "ours-llama": "hf-llama"}
OURS_OF_FAMILY = {"gpt2": "ours", "llama": "ours-llama"}  # the unpadded model of ours in each family
LLAMA_FIELDS = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
ADAMW_SETTINGS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # bf16 = autocast; weights stay fp32


def model_config(bench_config: BenchConfig, contender: Contender) -> ModelConfig:
    """Our ModelConfig for a contender (a transformers contender is built from this config's export)."""
    fields: dict[str, Any] = dict(
        vocab_size=bench_config.padded_vocab_size if contender.padded_vocab else bench_config.vocab_size,
        context_length=bench_config.context_length,
        d_model=bench_config.d_model,
        n_layer=bench_config.n_layer,
        n_head=bench_config.n_head,
        d_ff=4 * bench_config.d_model,
    )
    if contender.family == "llama":
        fields.update(LLAMA_FIELDS)
    return ModelConfig(**fields)


def flops_per_token(bench_config: BenchConfig, family: str) -> float:
    """Training FLOPs per token of the family's unpadded model (our count), shared by both members of a pair."""
    with torch.device("meta"):  # count without allocating
        model = GPT(model_config(bench_config, CONTENDERS[OURS_OF_FAMILY[family]]))
    return model.flops_per_token(bench_config.context_length)


def our_model(config: ModelConfig, seed: int) -> GPT:
    """Our model, initialized from `seed` (the same seed and config give the same weights)."""
    torch.manual_seed(seed)
    return GPT(config)


def export_for_transformers(bench_config: BenchConfig, family: str, seed: int, folder: Path) -> Path:
    """Write the family's seeded model of ours as a transformers folder; its reference loads from there."""
    ours = our_model(model_config(bench_config, CONTENDERS[OURS_OF_FAMILY[family]]), seed)
    return save_pretrained(ours, folder / family)


def load_transformers_model(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)


def quiet_transformers() -> None:
    """No loading progress bars or advisory warnings in the bench output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_optimizer(model: nn.Module, library: str) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer a user of that library would pick, and its name for the report."""
    groups = param_groups(model, WEIGHT_DECAY)
    if library == "ours":
        return AdamW(groups, **ADAMW_SETTINGS), "gpt.optim.AdamW (multi-tensor)"
    try:
        return torch.optim.AdamW(groups, **ADAMW_SETTINGS, fused=True), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return torch.optim.AdamW(groups, **ADAMW_SETTINGS, foreach=True), "torch.optim.AdamW(foreach=True)"


def loss_function(model: nn.Module, library: str) -> LossFunction:
    """(x, y) -> mean next-token loss, the way each library computes it.

    transformers shifts `labels` itself, so it gets `labels=x` (its loss covers T-1 positions
    of each row, ours T; the logits of all T positions are computed either way).
    """
    if library == "ours":
        return lambda x, y: model(x, targets=y)
    return lambda x, y: model(input_ids=x, labels=x).loss


@dataclass
class Trainee:
    """A contender ready to train: model, optimizer, and its loss in eager and compiled form."""

    contender: Contender
    model: nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    eager_loss: LossFunction
    compiled_loss: LossFunction | None = None

    def loss(self, mode: str) -> LossFunction:
        if mode == "eager":
            return self.eager_loss
        if self.compiled_loss is None:  # one compiled wrapper per model; each precision adds its own graph
            compiled = torch.compile(self.model, dynamic=False)
            self.compiled_loss = loss_function(compiled, self.contender.library)
        return self.compiled_loss


def build_trainee(
    contender: Contender, bench_config: BenchConfig, seed: int, hf_folders: dict[str, Path], device: torch.device
) -> Trainee:
    """The contender on `device` in training mode, with its optimizer; transformers' from `hf_folders[family]`."""
    if contender.library == "ours":
        model: nn.Module = our_model(model_config(bench_config, contender), seed)
    else:
        model = load_transformers_model(hf_folders[contender.family])
    model = model.to(device).train()
    optimizer, optimizer_name = make_optimizer(model, contender.library)
    return Trainee(contender, model, optimizer, optimizer_name, loss_function(model, contender.library))
