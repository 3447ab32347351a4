"""The command line of `python -m gpt bench`: arguments, the run's metadata, one config end to end, the JSON.

    python -m gpt bench --configs tiny --rounds 2 --out bench.json

Tables go to stdout after each config, progress lines to stderr; with `--out` the JSON
report is rewritten after each config, so a long run keeps what it has measured. Every
argument, `--out` and `--device` included, is checked before anything is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import contextlib
import datetime
import gc
import os
import platform
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import cli_args
from ..errors import UserError
from ..files import write_json
from ..runtime import enable_tf32, matmul_peak_flops, pick_device, published_peak_flops
from .contenders import (
    BENCH_CONFIGS, CONTENDERS, PRECISION_DTYPES, build_trainee, export_for_transformers, flops_per_token,
    model_config, quiet_transformers,
)
from .memory import add_memory, memory_method, memory_supported
from .report import format_config, generation_row, pair_ratios, progress, train_row
from .timing import bench_generation, bench_training, initial_losses, token_batches

# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


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
    parser.add_argument("--rounds", type=cli_args.positive_int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--steps", type=cli_args.positive_int, default=2, help="training steps per contender per round")
    parser.add_argument("--warmup", type=cli_args.positive_int, default=2,
                        help="untimed training steps per variant first")
    parser.add_argument("--batch-size", type=cli_args.non_negative_int, default=0,
                        help="training batch; 0 = the config's own")
    parser.add_argument("--gen-batch-sizes", default="1,8", help="comma list of generation batch sizes")
    parser.add_argument("--prompt-length", type=cli_args.positive_int, default=16,
                        help="generation prompt, random tokens")
    parser.add_argument("--new-tokens", type=cli_args.positive_int, default=128,
                        help="tokens each generation adds, exactly")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=cli_args.non_negative_int, default=0,
                        help="torch threads; 0 = torch's default")
    parser.add_argument("--seed", type=cli_args.seed, default=0, help="weights, batches and prompts")
    parser.add_argument("--out", type=cli_args.output_file, default=None,
                        help="also write the results as JSON to this file")
    args = parser.parse_args(list(argv))

    args.configs = _choices("--configs", args.configs, BENCH_CONFIGS)
    args.contenders = _choices("--contenders", args.contenders, CONTENDERS)
    args.precisions = _choices("--precisions", args.precisions, PRECISION_DTYPES)
    args.parts = _choices("--parts", args.parts, ("train", "memory", "generate"))
    args.modes = ("eager", "compiled") if args.compile else ("eager",)
    try:
        args.gen_batch_sizes = [cli_args.positive_int(b) for b in args.gen_batch_sizes.split(",")]
    except argparse.ArgumentTypeError:
        raise UserError(f"--gen-batch-sizes: expected comma-separated positive integers, "
                        f"got {args.gen_batch_sizes!r}") from None
    pick_device(args.device, "--device")
    return args


def _choices(flag: str, text: str, known: Sequence[str] | dict[str, Any]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        raise UserError(f"{flag}: unknown or missing {', '.join(unknown) or 'value'}; choose from {', '.join(known)}")
    return chosen


def require_transformers() -> None:
    """The bench measures against transformers, which only the `bench` extra installs."""
    if importlib.util.find_spec("transformers") is None:
        raise UserError('python -m gpt bench needs transformers: pip install -e ".[bench]"')


# ----------------------------------------------------------------------------
# The run's metadata
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------


def run_bench(argv: Sequence[str]) -> dict[str, Any]:
    """Run the benchmark the arguments describe; print the tables as it goes; return the JSON report."""
    args = parse_args(argv)
    require_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, "--device")
    enable_tf32(device)
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
                write_json(args.out, report)
    return report


def bench_cli(argv: list[str]) -> int:
    run_bench(argv)
    return 0
