"""`python -m gpt bench`: our GPT against transformers' GPT-2 and Llama, measured the same way.

This module is also the documentation of how we measure; each number it prints is
defined here.

Contenders (per config, e.g. `tiny` = 4 layers, 4 heads, d_model 256, context 256, batch 8):

    ours         our `GPT`, GPT-2 architecture, our AdamW, loss = `model(x, targets=y)`
                 (the fused chunked LM-head cross-entropy)
    ours-pad64   the same with the vocabulary padded from 50257 to 50304 (a multiple of 64)
    hf-gpt2      transformers' `GPT2LMHeadModel` (attn_implementation="sdpa"), loss from
                 `labels=x` (its own shift-by-one cross-entropy), torch.optim.AdamW
                 (fused=True when the device supports it; the JSON records which)
    ours-llama   our `GPT` with the Llama choices: RoPE, RMSNorm, SwiGLU, no biases, same d_ff
    hf-llama     transformers' `LlamaForCausalLM` with the same shapes

Every transformers model is loaded from our model's export (`save_pretrained`), so each
pair starts from the same weights. All optimizers use the same param groups
(`param_groups`: decay on matrices only) and lr 3e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1. No gradient clipping, no accumulation.

Training speed. One step = forward with the loss, backward, optimizer step, zero_grad.
Each variant (contender x precision x mode) is warmed up first; then, round by round,
every variant runs `--steps` steps on the same random token batches (A, B, C, A, B, C,
...), so a slow moment on a shared machine hits all of them alike. tokens/s =
batch x context x steps / seconds, its median over rounds is what we report, and every
ratio is ours' median over the reference's median. Precisions: fp32, and bf16 autocast
(weights and optimizer state stay fp32). Modes: eager, and with `--compile` also
`torch.compile(model)` (the loss is inside `forward` for every contender, so it is
compiled together with the model); compile time = first step - median step.

MFU. Achieved FLOP/s = tokens/s x FLOPs per token, where FLOPs per token is our
`GPT.flops_per_token` of the unpadded config (6 x matmul weights + the attention
matmuls), the same count for both members of a pair. Divided by the matmul peak the
bench measures in the same run (best of several large square matmuls in that
precision) and, on CUDA, by the device's published dense peak (fp32 means TF32 there,
since TF32 is switched on).

Peak training memory. Each variant runs again, alone, in a fresh process (spawned,
nothing else in it): warm-up steps plus one. On CUDA: `torch.cuda.max_memory_allocated`
during the steps, minus what was allocated before the model was built. On CPU: the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the model is built, so a
loader's transient peak does not count) minus the resident set before the model was
built. Both include weights, gradients, optimizer state, activations and temporaries;
the CPU figure also includes what the allocator keeps (and, when compiled, the
compiler's own memory). The JSON also has the memory right after building
(`built_memory_mib`); transformers maps its weights from the safetensors file and reads
them in lazily, so on CPU that figure is small for it, while the peak counts them.

Generation. Greedy, a random 16-token prompt, exactly 128 new tokens, batch 1 and 8,
fp32, eager: ours = `generate` with the KV cache; transformers =
`model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`, both from
the same weights; tokens/s = batch x 128 / seconds (the prompt's prefill included). The
new tokens of each pair are compared and the bench reports whether they are identical.

A CPU shared with other jobs distorts all of this unevenly: with torch's default of one
thread per core, every parallel op waits until the scheduler gives both threads back, so
an implementation that issues many small ops loses far more than one that issues few.
Measure on a quiet machine (the header records threads, allocator and versions), or pass
`--threads 1` on a busy one and say so.

    python -m gpt bench                                   # all configs, fp32 and bf16, eager
    python -m gpt bench --configs tiny --rounds 2 --out bench.json
    python -m gpt bench --compile --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import UserError
from .generate import generate
from .model import GPT
from .optim import AdamW, param_groups
from .train import pick_device

# ----------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------

MiB = 2**20


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
PEAK_MATMUL = {"cuda": (8192, 20), "cpu": (2048, 8)}  # device type -> (square matmul size, timed repeats)

# Published dense peaks in TFLOP/s, (bf16, tf32), matched against torch.cuda.get_device_name() in this order.
PUBLISHED_PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("H200", (989.0, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.7)),  # SXM
    ("A100", (312.0, 156.0)),
]


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


# ----------------------------------------------------------------------------
# Building contenders
# ----------------------------------------------------------------------------


def our_model(config: ModelConfig, seed: int) -> GPT:
    """Our model, initialized from `seed` (the same seed and config give the same weights)."""
    torch.manual_seed(seed)
    return GPT(config)


def export_for_transformers(bench_config: BenchConfig, family: str, seed: int, folder: Path) -> Path:
    """Write the family's seeded model of ours as a transformers folder; its reference loads from there."""
    from .weights import save_pretrained

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


def loss_function(model: nn.Module, library: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
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
    eager_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    compiled_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def loss(self, mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if mode == "eager":
            return self.eager_loss
        if self.compiled_loss is None:  # one compiled wrapper per model; each precision adds its own graph
            compiled = torch.compile(self.model, dynamic=False)
            self.compiled_loss = loss_function(compiled, self.contender.library)
        return self.compiled_loss


def build_trainee(
    contender: Contender, bench_config: BenchConfig, seed: int, hf_folders: dict[str, Path], device: torch.device
) -> Trainee:
    if contender.library == "ours":
        model: nn.Module = our_model(model_config(bench_config, contender), seed)
    else:
        model = load_transformers_model(hf_folders[contender.family])
    model = model.to(device).train()
    optimizer, optimizer_name = make_optimizer(model, contender.library)
    return Trainee(contender, model, optimizer, optimizer_name, loss_function(model, contender.library))


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(device: torch.device, work: Callable[[], object]) -> float:
    """Wall-clock seconds of `work`, waiting for the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_batches(
    count: int, batch_size: int, bench_config: BenchConfig, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random (x, y) pairs, y = x shifted by one token; the same for every contender."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, bench_config.context_length + 1)
    windows = [torch.randint(0, bench_config.vocab_size, shape, generator=generator) for _ in range(count)]
    return [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows]


def train_step_function(trainee: Trainee, precision: str, mode: str, device: torch.device) -> Callable:
    """One full training step on a batch (x, y); returns the loss (not synchronized)."""
    loss_of = trainee.loss(mode)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with precision_context(device, precision):
            loss = loss_of(x, y)
        loss.backward()
        trainee.optimizer.step()
        trainee.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of several large square matmuls in `dtype`: the achievable peak for MFU."""
    size, repeats = PEAK_MATMUL.get(device.type, PEAK_MATMUL["cpu"])
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up: library initialization, kernel selection
    best = min(seconds(device, lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def published_peak_flops(device: torch.device) -> dict[str, float] | None:
    """The device's published dense peak per precision (fp32 = TF32), if it is a GPU we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PUBLISHED_PEAK_TFLOPS:
        if key in name:
            return {"bf16": bf16 * 1e12, "fp32": tf32 * 1e12}
    return None


# ----------------------------------------------------------------------------
# Training speed
# ----------------------------------------------------------------------------


@dataclass
class TrainVariant:
    """One timed combination: a contender in a precision and mode."""

    contender: str
    precision: str
    mode: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    first_step_s: float = 0.0
    step_s_rounds: list[float] = field(default_factory=list)


def bench_training(
    trainees: dict[str, Trainee], batches: list[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace,
    device: torch.device,
) -> list[TrainVariant]:
    """Warm up every variant, then time them round by round, interleaved; returns the timings."""
    variants = [
        TrainVariant(name, precision, mode, train_step_function(trainee, precision, mode, device))
        for name, trainee in trainees.items()
        for precision in args.precisions
        for mode in args.modes
    ]
    for variant in variants:
        progress(f"  warming up {variant.contender} {variant.precision} {variant.mode}")
        variant.first_step_s = seconds(device, lambda: variant.step(*batches[0]))
        for i in range(1, args.warmup):
            variant.step(*batches[i % len(batches)])
    for round_index in range(args.rounds):
        progress(f"  round {round_index + 1}/{args.rounds}")
        for variant in variants:
            def run_steps() -> None:
                for i in range(args.steps):
                    variant.step(*batches[i % len(batches)])

            variant.step_s_rounds.append(seconds(device, run_steps) / args.steps)
    return variants


def initial_losses(
    trainees: dict[str, Trainee], batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Each contender's fp32 loss on the first batch before any step (a pair's losses should agree)."""
    with torch.no_grad():
        return {name: trainee.eager_loss(*batch).item() for name, trainee in trainees.items()}


# ----------------------------------------------------------------------------
# Peak memory, in a fresh process per variant
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryProbe:
    """Everything a fresh process needs to rebuild one variant and train it for a few steps."""

    bench_config: BenchConfig
    contender: str
    precision: str
    mode: str
    device: str
    batch_size: int
    steps: int
    seed: int
    threads: int
    hf_folders: dict[str, str]


def _proc_status_kib(key: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_now(device: torch.device) -> int:
    """Bytes in use now: allocated by torch on CUDA, the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def reset_memory_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the steps minus allocated before the model, fresh process"
    return "peak RSS (VmHWM, reset after building) minus RSS before building the model, fresh process"


def run_memory_probe(probe: MemoryProbe) -> dict[str, float]:
    """Build one variant in this (fresh) process, train warm-up + 1 steps; report MiB over the pre-model baseline."""
    import transformers

    quiet_transformers()
    _ = transformers.GPT2LMHeadModel, transformers.LlamaForCausalLM  # import the model code before the baseline
    torch.set_num_threads(probe.threads)
    device = torch.device(probe.device)
    configure_device(device)
    bench_config = probe.bench_config
    batches = token_batches(1, probe.batch_size, bench_config, probe.seed, device)
    gc.collect()
    baseline = memory_now(device)
    hf_folders = {family: Path(path) for family, path in probe.hf_folders.items()}
    trainee = build_trainee(CONTENDERS[probe.contender], bench_config, probe.seed, hf_folders, device)
    gc.collect()
    built = memory_now(device)
    reset_memory_peak(device)
    step = train_step_function(trainee, probe.precision, probe.mode, device)
    for _ in range(probe.steps):
        step(*batches[0])
    synchronize(device)
    return {"peak_memory_mib": (memory_peak(device) - baseline) / MiB, "built_memory_mib": (built - baseline) / MiB}


def in_fresh_process(function: Callable[[Any], Any], argument: Any) -> Any:
    """Run `function(argument)` in a newly spawned Python process and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, argument).result()


def memory_supported(device: torch.device) -> bool:
    return device.type == "cuda" or (Path("/proc/self/status").exists() and Path("/proc/self/clear_refs").exists())


# ----------------------------------------------------------------------------
# Generation speed
# ----------------------------------------------------------------------------


@dataclass
class GenerationRun:
    contender: str
    batch_size: int
    seconds_rounds: list[float] = field(default_factory=list)
    new_tokens: torch.Tensor | None = None  # (B, new) from the first timed round


def generation_function(model: nn.Module, library: str, new_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """prompt ids (B, P) -> exactly `new_tokens` greedy new tokens (B, new_tokens), through each library's API."""
    if library == "ours":
        return lambda ids: generate(model, ids, max_new_tokens=new_tokens, temperature=0.0)[:, ids.shape[1]:]

    def hf_generate(ids: torch.Tensor) -> torch.Tensor:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return out[:, ids.shape[1]:]

    return hf_generate


def bench_generation(
    bench_config: BenchConfig, names: Sequence[str], hf_folders: dict[str, Path], args: argparse.Namespace,
    device: torch.device,
) -> list[GenerationRun]:
    """Greedy generation, fp32, each pair from the same weights, interleaved round by round."""
    generators = {}
    for name in names:
        contender = CONTENDERS[name]
        if contender.library == "ours":
            model: nn.Module = our_model(model_config(bench_config, contender), args.seed)
        else:
            model = load_transformers_model(hf_folders[contender.family])
        generators[name] = generation_function(model.to(device).eval(), contender.library, args.new_tokens)
    prompt_generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = {
        b: torch.randint(0, bench_config.vocab_size, (b, args.prompt_length), generator=prompt_generator).to(device)
        for b in args.gen_batch_sizes
    }
    runs = [GenerationRun(name, b) for b in args.gen_batch_sizes for name in names]
    with torch.no_grad():
        for name, produce in generators.items():  # warm-up: one short generation each
            progress(f"  warming up generation: {name}")
            produce(prompts[args.gen_batch_sizes[0]][:1])
        for round_index in range(args.rounds):
            progress(f"  generation round {round_index + 1}/{args.rounds}")
            for run in runs:
                produce, prompt = generators[run.contender], prompts[run.batch_size]
                outputs: list[torch.Tensor] = []
                run.seconds_rounds.append(seconds(device, lambda: outputs.append(produce(prompt))))
                if run.new_tokens is None:
                    run.new_tokens = outputs[0].cpu()
    return runs


# ----------------------------------------------------------------------------
# One config, end to end
# ----------------------------------------------------------------------------


def bench_config_run(
    config_name: str, args: argparse.Namespace, device: torch.device, peaks: dict[str, Any], work_dir: Path
) -> dict[str, Any]:
    """Train, memory and generation measurements of one config, as the JSON section for it."""
    bench_config = BENCH_CONFIGS[config_name]
    batch_size = args.batch_size or bench_config.batch_size(device)
    tokens_per_step = batch_size * bench_config.context_length
    contenders = [CONTENDERS[name] for name in args.contenders]
    families = sorted({c.family for c in contenders})
    hf_folders = {
        family: export_for_transformers(bench_config, family, args.seed, work_dir / config_name)
        for family in sorted({c.family for c in contenders if c.library == "transformers"})
    }
    flops = {family: flops_per_token(bench_config, family) for family in families}
    result: dict[str, Any] = {
        "shape": {**asdict(bench_config), "batch_size": batch_size},
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops,
    }

    if "train" in args.parts or "memory" in args.parts:
        progress(f"{config_name}: building {len(args.contenders)} contenders")
        trainees = {c.name: build_trainee(c, bench_config, args.seed, hf_folders, device) for c in contenders}
        batches = token_batches(max(args.steps, args.warmup), batch_size, bench_config, args.seed, device)
        losses = initial_losses(trainees, batches[0])
        result["contenders"] = {
            name: {
                "family": trainee.contender.family,
                "library": trainee.contender.library,
                "vocab_size": model_config(bench_config, trainee.contender).vocab_size,
                "parameters": sum(p.numel() for p in trainee.model.parameters()),
                "optimizer": trainee.optimizer_name,
                "initial_loss": losses[name],
            }
            for name, trainee in trainees.items()
        }
        rows = []
        if "train" in args.parts:
            for variant in bench_training(trainees, batches, args, device):
                rows.append(train_row(variant, tokens_per_step, flops[CONTENDERS[variant.contender].family], peaks))
        del trainees
        gc.collect()
        if "memory" in args.parts and memory_supported(device):
            rows = add_memory(rows, bench_config, args, device, batch_size, hf_folders)
        result["train"] = rows
        result["train_ratios"] = pair_ratios(rows, ("precision", "mode"), "tokens_per_s")

    if "generate" in args.parts:
        names = [name for name in args.contenders if name != "ours-pad64"]
        runs = bench_generation(bench_config, names, hf_folders, args, device)
        rows = [generation_row(run, runs, args.new_tokens) for run in runs]
        result["generate"] = rows
        result["generate_ratios"] = pair_ratios(rows, ("batch_size",), "tokens_per_s")
    return result


def add_memory(
    rows: list[dict[str, Any]],
    bench_config: BenchConfig,
    args: argparse.Namespace,
    device: torch.device,
    batch_size: int,
    hf_folders: dict[str, Path],
) -> list[dict[str, Any]]:
    """Peak memory of each variant, each measured alone in a fresh process; merged into the train rows."""
    by_key = {(row["contender"], row["precision"], row["mode"]): row for row in rows}
    for name in args.contenders:
        for precision in args.precisions:
            for mode in args.modes:
                progress(f"  memory: {name} {precision} {mode} (fresh process)")
                probe = MemoryProbe(
                    bench_config=bench_config,
                    contender=name,
                    precision=precision,
                    mode=mode,
                    device=str(device),
                    batch_size=batch_size,
                    steps=args.warmup + 1,
                    seed=args.seed,
                    threads=torch.get_num_threads(),
                    hf_folders={family: str(path) for family, path in hf_folders.items()},
                )
                row = by_key.setdefault((name, precision, mode), dict(contender=name, precision=precision, mode=mode))
                row.update(in_fresh_process(run_memory_probe, probe))
    return list(by_key.values())


# ----------------------------------------------------------------------------
# Turning timings into the report
# ----------------------------------------------------------------------------


def train_row(variant: TrainVariant, tokens_per_step: int, flops: float, peaks: dict[str, Any]) -> dict[str, Any]:
    median_step_s = statistics.median(variant.step_s_rounds)
    tokens_per_s = tokens_per_step / median_step_s
    achieved = tokens_per_s * flops
    published = peaks["published"]
    return {
        "contender": variant.contender,
        "precision": variant.precision,
        "mode": variant.mode,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_rounds": [tokens_per_step / s for s in variant.step_s_rounds],
        "step_ms": 1000 * median_step_s,
        "first_step_s": variant.first_step_s,
        "compile_s": variant.first_step_s - median_step_s if variant.mode == "compiled" else None,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peaks["measured"][variant.precision],
        "mfu_published": achieved / published[variant.precision] if published else None,
    }


def generation_row(run: GenerationRun, runs: list[GenerationRun], new_tokens: int) -> dict[str, Any]:
    tokens = run.batch_size * new_tokens
    row: dict[str, Any] = {
        "contender": run.contender,
        "batch_size": run.batch_size,
        "tokens_per_s": tokens / statistics.median(run.seconds_rounds),
        "tokens_per_s_rounds": [tokens / s for s in run.seconds_rounds],
    }
    reference_name = REFERENCE.get(run.contender)
    reference = next((r for r in runs if r.contender == reference_name and r.batch_size == run.batch_size), None)
    if reference is not None:
        same = run.new_tokens == reference.new_tokens
        row["identical_to_reference"] = bool(same.all())
        row["matching_token_fraction"] = same.float().mean().item()
    return row


def pair_ratios(rows: list[dict[str, Any]], keys: tuple[str, ...], metric: str) -> list[dict[str, Any]]:
    """ours / reference for each pair with equal `keys`: the metric's ratio (from medians) and the memory ratio."""
    ratios = []
    for row in rows:
        reference_name = REFERENCE.get(row["contender"])
        matches = [r for r in rows if r["contender"] == reference_name and all(r[k] == row[k] for k in keys)]
        if not matches:
            continue
        reference = matches[0]
        ratio: dict[str, Any] = {"contender": row["contender"], "reference": reference_name}
        ratio.update((k, row[k]) for k in keys)
        if metric in row and metric in reference:
            ratio[f"{metric}_ratio"] = row[metric] / reference[metric]
        if "peak_memory_mib" in row and "peak_memory_mib" in reference:
            ratio["peak_memory_ratio"] = row["peak_memory_mib"] / reference["peak_memory_mib"]
        ratios.append(ratio)
    return ratios


def format_config(name: str, section: dict[str, Any]) -> str:
    """The terminal tables for one config."""
    shape = section["shape"]
    lines = [
        f"\n== {name}: {shape['n_layer']} layers, {shape['n_head']} heads, d_model {shape['d_model']}, "
        f"context {shape['context_length']}, batch {shape['batch_size']}, vocab {shape['vocab_size']} =="
    ]
    for contender, info in section.get("contenders", {}).items():
        params = f"{info['parameters'] / 1e6:.2f}M params"
        lines.append(f"  {contender:<11} {params:>14}  initial loss {info['initial_loss']:.4f}  {info['optimizer']}")
    if "train" in section:
        header = ["prec", "mode", "tok/s", "step ms", "MFU", "MFU pub", "peak MiB", "compile s"]
        lines.append(f"  {'training':<11} {header[0]:<5} {header[1]:<8} " + " ".join(f"{h:>9}" for h in header[2:]))
        for row in section["train"]:
            cells = [
                _cell(row.get("tokens_per_s"), ",.0f"),
                _cell(row.get("step_ms"), ".1f"),
                _cell(row.get("mfu"), ".1%"),
                _cell(row.get("mfu_published"), ".1%"),
                _cell(row.get("peak_memory_mib"), ",.0f"),
                _cell(row.get("compile_s"), ".1f"),
            ]
            lines.append(f"  {row['contender']:<11} {row['precision']:<5} {row['mode']:<8} " + " ".join(cells))
        for ratio in section["train_ratios"]:
            measured = [f"{label} {ratio[key]:.2f}x" for key, label in
                        (("tokens_per_s_ratio", "tokens/s"), ("peak_memory_ratio", "peak memory")) if key in ratio]
            pair = f"{ratio['contender']} / {ratio['reference']}, {ratio['precision']} {ratio['mode']}"
            lines.append(f"  ratio {pair}: " + ", ".join(measured))
    if "generate" in section:
        lines.append(f"  {'generation':<11} {'batch':>5} {'tok/s':>9}  tokens as the reference's")
        for row in section["generate"]:
            same = ""
            if "identical_to_reference" in row:
                same = "identical" if row["identical_to_reference"] else f"{row['matching_token_fraction']:.0%} equal"
            speed = _cell(row["tokens_per_s"], ",.1f")
            lines.append(f"  {row['contender']:<11} {row['batch_size']:>5} {speed}  {same}")
        for ratio in section["generate_ratios"]:
            lines.append(
                f"  ratio {ratio['contender']} / {ratio['reference']}, batch {ratio['batch_size']}: "
                f"tokens/s {ratio['tokens_per_s_ratio']:.2f}x"
            )
    return "\n".join(lines)


def _cell(value: float | None, spec: str, width: int = 9) -> str:
    """`value` formatted by `spec`, right-aligned in `width` characters; '-' when there is no value."""
    return (format(value, spec) if value is not None else "-").rjust(width)


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def configure_device(device: torch.device) -> None:
    """TF32 for fp32 matmuls on CUDA (what a user training there would switch on)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_metadata(argv: Sequence[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import transformers

    return {
        "command": "python -m gpt bench " + shlex.join(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "allocator_preload": os.environ.get("LD_PRELOAD", ""),  # e.g. tcmalloc; empty = the C library's malloc
        "tf32": device.type == "cuda",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps": args.warmup,
        "precisions": list(args.precisions),
        "modes": list(args.modes),
        "seed": args.seed,
        "memory_method": memory_method(device),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt bench",
        description="Training and generation speed, MFU and peak memory: our GPT against transformers' "
        "GPT2LMHeadModel and LlamaForCausalLM, interleaved round by round in one process.",
    )
    parser.add_argument("--configs", default="tiny,small,gpt2-124m", help=f"comma list of {', '.join(BENCH_CONFIGS)}")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--parts", default="train,memory,generate", help="comma list of train, memory, generate")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant first")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch; 0 = the config's own")
    parser.add_argument("--gen-batch-sizes", default="1,8", help="comma list of generation batch sizes")
    parser.add_argument("--prompt-length", type=int, default=16, help="generation prompt, random tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens each generation adds, exactly")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--seed", type=int, default=0, help="weights, batches and prompts")
    parser.add_argument("--out", default="", help="also write the results as JSON to this file")
    args = parser.parse_args(list(argv))

    args.configs = _choices("--configs", args.configs, BENCH_CONFIGS)
    args.contenders = _choices("--contenders", args.contenders, CONTENDERS)
    args.precisions = _choices("--precisions", args.precisions, PRECISION_DTYPES)
    args.parts = _choices("--parts", args.parts, ("train", "memory", "generate"))
    args.modes = ("eager", "compiled") if args.compile else ("eager",)
    try:
        args.gen_batch_sizes = [int(b) for b in args.gen_batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--gen-batch-sizes: expected comma-separated integers, got {args.gen_batch_sizes!r}") from None
    for name in ("rounds", "steps", "warmup", "prompt_length", "new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    return args


def _choices(flag: str, text: str, known: Sequence[str] | dict[str, Any]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        raise UserError(f"{flag}: unknown or missing {', '.join(unknown) or 'value'}; choose from {', '.join(known)}")
    return chosen


def run_bench(argv: Sequence[str]) -> dict[str, Any]:
    """Run the benchmark the arguments describe; print the tables as it goes; return the JSON report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    configure_device(device)
    quiet_transformers()
    # Every contender x precision adds a graph to the same forward's cache; never fall back to eager silently.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    report: dict[str, Any] = {"meta": run_metadata(argv, args, device)}
    print("\n".join(f"{key}: {value}" for key, value in report["meta"].items()), flush=True)
    progress("measuring the matmul peak")
    measured = {precision: matmul_peak_flops(device, dtype) for precision, dtype in PRECISION_DTYPES.items()}
    report["peak_flops"] = {"measured": measured, "published": published_peak_flops(device)}
    print("matmul peak (measured): " + ", ".join(f"{p} {flops / 1e12:.2f} TFLOP/s" for p, flops in measured.items()))
    report["configs"] = {}
    with tempfile.TemporaryDirectory(prefix="gpt-bench-") as work_dir:
        for name in args.configs:
            report["configs"][name] = bench_config_run(name, args, device, report["peak_flops"], Path(work_dir))
            print(format_config(name, report["configs"][name]), flush=True)
            if args.out:  # after each config, so a long run keeps what it has measured
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def bench_cli(argv: list[str]) -> int:
    run_bench(argv)
    return 0

