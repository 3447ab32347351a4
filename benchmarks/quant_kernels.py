"""Weight-only int8/int4 products of one decoding row on CPU: how fast each form streams its weights.

For each (N, K) weight of SmolLM2-135M and one row of x (M = 1, what a batch-1 decoding step
multiplies), six forms of out = x @ w.T, timed side by side in one run:

    fp32 x @ w.T             the plain float product (what nn.Linear does)
    fp32 row_blocked         gpt.linear.row_blocked_product, the fp32 decoding path of gpt.linear.Linear
    int8 aten                torch.ops.aten._weight_int8pack_mm (per-channel scales)
    int8 ours                gpt.quantize.cpu_kernels.int8_matmul
    int4 aten                torch.ops.aten._weight_int4pack_mm_for_cpu on _convert_weight_to_int4pack_for_cpu
    int4 ours                gpt.quantize.cpu_kernels.int4_matmul

Each shape is built in enough distinct copies (--working-set-mb, 64 MB of int8 by default,
eight times this machine's L3) that the calls, cycling through them, read their weights from
memory as a decoding step does, not from a cache that one repeated small weight would sit in.
Each form is timed over `rounds` rounds that interleave the forms (a slow moment on a shared
machine hits them all alike); a round times enough back-to-back calls to last about
--target-ms, and the median round is reported, with the bandwidth it implies: bytes of weight
(int4: codes plus per-group scales and zero points) read per second. The same run measures the
machine's read bandwidth STREAM-style (torch.sum over a 512 MB float32 tensor) as the ceiling.
"per token" adds the shapes up as one SmolLM2 decoding step walks them: 30 layers of q, k, v,
o, gate, up, down, plus the tied LM head.

    python -m benchmarks.quant_kernels                     # 2 threads, int4 groups of 32
    python -m benchmarks.quant_kernels --threads 1 --group-size 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from gpt.bench.cli import cpu_name
from gpt.linear import row_blocked_product
from gpt.quantize import cpu_kernels

# (N, K) of SmolLM2-135M's projections and how often one decoding step uses each.
SHAPES = {  # name: (N, K, uses per token)
    "q, o": (576, 576, 60),
    "k, v": (192, 576, 60),
    "gate, up": (1536, 576, 60),
    "down": (576, 1536, 30),
    "lm head": (49152, 576, 1),
}
FORMS = ["fp32 x @ w.T", "fp32 row_blocked", "int8 aten", "int8 ours", "int4 aten", "int4 ours"]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight (N, K) -> qweight (N, K) int8, scales (N,)."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of K: weight (N, K) -> q (N, K) int32 in 0..15, scales and zeros (N, K/G).

    w ~ (q - 8) * scale + zero, with the group's minimum at q = 0 and maximum at q = 15.
    """
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = low + 8 * scales
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> codes (N, K/2) uint8, q[:, 2j] in the low nibble, q[:, 2j + 1] in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


Form = Callable[[], torch.Tensor]


def forms_for(n: int, k: int, group_size: int, generator: torch.Generator) -> tuple[dict[str, Form], dict[str, int]]:
    """The six forms for one (N, K) weight, as zero-argument callables, and the weight bytes each reads."""
    weight = torch.randn(n, k, generator=generator) * 0.02  # (N, K)
    x = torch.randn(1, k, generator=generator)  # (1, K)
    qweight, scales = quantize_int8(weight)
    q4, scales4, zeros4 = quantize_int4(weight, group_size)
    codes = pack_nibbles(q4)
    aten_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    aten_scales_zeros = torch.stack([scales4, zeros4], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    threads = torch.get_num_threads()
    forms = {
        "fp32 x @ w.T": lambda: x @ weight.T,
        "fp32 row_blocked": lambda: row_blocked_product(x, weight, threads),
        "int8 aten": lambda: torch.ops.aten._weight_int8pack_mm(x, qweight, scales),
        "int8 ours": lambda: cpu_kernels.int8_matmul(x, qweight, scales),
        "int4 aten": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, aten_int4, group_size, aten_scales_zeros),
        "int4 ours": lambda: cpu_kernels.int4_matmul(x, codes, scales4, zeros4, group_size),
    }
    int4_bytes = n * k // 2 + 2 * 4 * n * (k // group_size)
    nbytes = {"fp32 x @ w.T": 4 * n * k, "fp32 row_blocked": 4 * n * k, "int8 aten": n * k + 4 * n,
              "int8 ours": n * k + 4 * n, "int4 aten": int4_bytes, "int4 ours": int4_bytes}
    # Sanity: each quantized pair agrees (same quantized weights, so float rounding only).
    torch.testing.assert_close(forms["int8 ours"](), forms["int8 aten"](), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(forms["int4 ours"](), forms["int4 aten"](), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(forms["fp32 row_blocked"](), forms["fp32 x @ w.T"](), atol=1e-4, rtol=1e-4)
    return forms, nbytes


def time_forms(copies: list[dict[str, Form]], rounds: int, target_s: float) -> dict[str, float]:
    """Median seconds per call of each form, rounds interleaving the forms, calls cycling through the copies."""
    names = list(copies[0])
    calls = {}
    for name in names:  # warm up, and size each round to about target_s
        for forms in copies:
            forms[name]()
        start = time.perf_counter()
        copies[0][name]()
        calls[name] = max(len(copies), int(target_s / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            for call in range(calls[name]):
                copies[call % len(copies)][name]()
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def read_bandwidth(rounds: int) -> float:
    """Bytes per second that torch.sum reads from a 512 MB float32 tensor (median of `rounds`)."""
    data = torch.ones(128 * 1024 * 1024)
    data.sum()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def lscpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return cpu_name()
    fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    return " ".join(fields.get(key, "").strip() for key in ("Model name", "CPU family", "Model")).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size along K (576 allows 32, 64)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target-ms", type=float, default=20.0, help="length of one timed round of one form")
    parser.add_argument("--working-set-mb", type=float, default=64.0,
                        help="int8 megabytes of weight copies per shape, cycled through so they stream from memory")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        sys.exit(f"the int8/int4 kernels are unavailable: {cpu_kernels.why_unavailable()}")
    load_before = os.getloadavg()
    print(f"{lscpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"int4 groups of {args.group_size}, M = 1; load average {load_before[0]:.2f}")
    bandwidth = read_bandwidth(args.rounds)
    print(f"read bandwidth (torch.sum over 512 MB): {bandwidth / 1e9:.1f} GB/s\n")

    generator = torch.Generator().manual_seed(0)
    header = f"{'shape (N x K)':22s}" + "".join(f"{name:>19s}" for name in FORMS)
    print(header + "\n" + " " * 22 + "".join(f"{'us':>10s} {'GB/s':>8s}" for _ in FORMS))
    rows = []
    per_token = {name: 0.0 for name in FORMS}
    per_token_bytes = {name: 0 for name in FORMS}
    for label, (n, k, uses) in SHAPES.items():
        # Enough distinct copies of the weight that, as in a real decoding step, they do not fit in
        # the caches: the calls cycle through them (the LM head alone is larger than any cache).
        copies = max(1, math.ceil(args.working_set_mb * 1e6 / (n * k)))  # by the int8 size
        built = [forms_for(n, k, args.group_size, generator) for _ in range(copies)]
        nbytes = built[0][1]
        seconds = time_forms([forms for forms, _ in built], args.rounds, args.target_ms / 1000)
        line = f"{label + f' {n} x {k}':22s}"
        for name in FORMS:
            line += f"{seconds[name] * 1e6:10.1f} {nbytes[name] / seconds[name] / 1e9:8.2f}"
            per_token[name] += uses * seconds[name]
            per_token_bytes[name] += uses * nbytes[name]
        print(line, flush=True)
        rows.append({"shape": label, "n": n, "k": k, "uses_per_token": uses, "copies": copies,
                     "forms": {name: {"us": seconds[name] * 1e6, "weight_bytes": nbytes[name],
                                      "gb_per_s": nbytes[name] / seconds[name] / 1e9} for name in FORMS}})
    print("\nper token (all products of one SmolLM2 decoding step):")
    for name in FORMS:
        limit = per_token_bytes[name] / bandwidth
        print(f"  {name:18s} {per_token[name] * 1e3:8.2f} ms  {per_token_bytes[name] / 1e6:7.1f} MB  "
              f"{per_token_bytes[name] / per_token[name] / 1e9:6.2f} GB/s  "
              f"{limit / per_token[name]:5.0%} of the bandwidth limit ({1 / limit:.0f} tokens/s)")
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.2f} at the end")

    out = args.out or Path("benchmarks/results") / f"quant-kernels-cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m benchmarks.quant_kernels " + shlex.join(sys.argv[1:]),
        "cpu": lscpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": args.group_size,
        "rounds": args.rounds, "working_set_mb": args.working_set_mb,
        "load_average_before": load_before, "load_average_after": load_after,
        "read_bandwidth_gb_per_s": bandwidth / 1e9, "shapes": rows,
        "per_token": {name: {"ms": per_token[name] * 1e3, "weight_bytes": per_token_bytes[name],
                             "gb_per_s": per_token_bytes[name] / per_token[name] / 1e9} for name in FORMS},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
