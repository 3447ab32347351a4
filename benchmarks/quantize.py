"""Quantized models side by side: perplexity, weight memory, peak RSS, and batch-1 decoding against the bandwidth limit.

    python -m benchmarks.quantize                                    # SmolLM2-135M-Instruct, fp32 int8 int4:32 int4:128
    python -m benchmarks.quantize --formats fp32,int8 --no-perplexity --out results.json

Each quantized format is first written as a folder by `python -m gpt quantize` (every
projection and the LM head), then measured in a process of its own that loads that folder,
so its peak RSS is what a user of the quantized model pays (no float model on the way).
The fp32 row loads `--model` itself. Each process measures:

    perplexity   `--text` (or its last `--held-out` fraction of tokens) with sliding windows (`--window`,
                 `--stride`), as `python -m gpt evaluate --text`
    decode       `--new-tokens` greedy tokens after a short prompt, batch 1, no eos; the best of `--rounds`
    where time   the same decode with a timer around every linear layer (projections and head): the
    goes         share of a token spent in the weight products, the rest being attention, norms, RoPE,
                 sampling and Python

The read bandwidth is measured in the same run (the median of 7 sums over a 512 MB float32 tensor on the
same threads), before and after the formats, and each format's tokens/s is set against its
limit: bandwidth / bytes read per token, those bytes being the projections' and the head's
weights (codes, scales and zero points when quantized; the embedding lookup reads one row).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.quant_kernels import read_bandwidth
from gpt.bench.cli import cpu_name
from gpt.quantize import parse_scheme

DEFAULT_FORMATS = "fp32,int8,int4:32,int4:128"
MiB = 2**20


def streamed_bytes(model: nn.Module) -> int:
    """Bytes one decoding step reads from the weight matrices: every projection and the LM head."""
    from gpt.quantize import QuantizedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for name, t in module.named_buffers() if name != "bias")
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def decode_seconds(model: nn.Module, prompt: list[int], new_tokens: int) -> float:
    from gpt.generate import stream_tokens

    start = time.perf_counter()
    for _ in stream_tokens(model, [prompt], new_tokens, temperature=0.0):
        pass
    return time.perf_counter() - start


def time_in_linear_layers(model: nn.Module, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds in the linear layers, seconds in all) of one decode run, by timers around each linear layer."""
    from gpt.quantize import QuantizedLinear

    spent = [0.0]
    handles = []

    def before(module: nn.Module, args: tuple) -> None:
        module._started = time.perf_counter()

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        spent[0] += time.perf_counter() - module._started

    for module in model.modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    total = decode_seconds(model, prompt, new_tokens)
    for handle in handles:
        handle.remove()
    # Only the generated tokens: the prompt's prefill is a few percent of the run and is included in both.
    return spent[0], total


def measure_one(args: argparse.Namespace) -> dict:
    """Everything for one format, in this process."""
    from gpt.data.corpus import load_text_corpus
    from gpt.evaluate.language_model import text_metrics
    from gpt.quantize import weight_bytes
    from gpt.weights import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    loaded = load_model_and_tokenizer(args.source)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    row: dict = {"format": args.one, "weight_bytes": weight_bytes(model), "streamed_bytes": streamed_bytes(model)}
    text = Path(args.text).read_text(encoding="utf-8")
    prompt = tokenizer.encode(text[:200])[:16]
    if args.held_out:  # the validation split the training scripts hold out of --data.path TEXT, as text
        _, val, _ = load_text_corpus(args.text, tokenizer, args.held_out)
        text = tokenizer.decode(val.tolist())
    with torch.no_grad():
        decode_seconds(model, prompt, 8)  # warm-up (and the kernels' first load)
        best = min(decode_seconds(model, prompt, args.new_tokens) for _ in range(args.rounds))
        row["decode_tokens_per_s"] = args.new_tokens / best
        in_linear, total = time_in_linear_layers(model, prompt, args.new_tokens)
        row["linear_share"] = in_linear / total
        row["ms_per_token_outside_linear"] = 1000 * (total - in_linear) / args.new_tokens
        row["peak_rss_mib_decode"] = peak_rss_mib()  # loading and decoding; the perplexity's batches come next
        if args.perplexity:
            metrics = text_metrics(model, tokenizer, text, args.window, args.stride)
            row.update(perplexity=metrics["perplexity"], loss=metrics["loss"], scored_tokens=metrics["scored_tokens"])
    row["peak_rss_mib"] = peak_rss_mib()  # with the perplexity's batches of `--window` tokens
    return row


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent,
    whose 512 MB bandwidth buffer would then be every child's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help="comma-separated: fp32, int8, int4, int4:G, int4:G:symmetric (no zero points)")
    parser.add_argument("--text", default="data/botchan.txt")
    parser.add_argument("--held-out", type=float, default=0.0, metavar="FRACTION",
                        help="perplexity on the validation split (this fraction, at the end) that the training "
                             "scripts hold out of --text, as `prune --recover-steps` does; 0 = the whole text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-perplexity", dest="perplexity", action="store_false")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one format ...
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)  # ... loaded from here
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)))
        return 0

    torch.set_num_threads(args.threads)
    bandwidth_before = read_bandwidth(rounds=7) / 1e9
    rows = []
    with tempfile.TemporaryDirectory() as folders:
        for fmt in args.formats.split(","):
            source = args.model
            if fmt != "fp32":
                source = str(Path(folders) / fmt.replace(":", "-"))
                scheme = parse_scheme(fmt)
                options = [] if scheme.format == "int8" else ["--group-size", str(scheme.group_size)]
                options += ["--symmetric"] if scheme.symmetric else []
                subprocess.run([sys.executable, "-m", "gpt", "quantize", "--model", args.model, "--to", scheme.format,
                                *options, "--out", source], check=True)
            child = [sys.executable, "-m", "benchmarks.quantize", *(argv if argv is not None else sys.argv[1:]),
                     "--one", fmt, "--source", source]
            done = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[{fmt} measured]", file=sys.stderr)
    bandwidth = max(bandwidth_before, read_bandwidth(rounds=7) / 1e9)
    fp32 = next((r for r in rows if r["format"] == "fp32"), None)
    print(f"\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} threads); {cpu_name()}; torch {torch.__version__}")
    print(f"{'format':<10} {'ppl':>8} {'Δppl':>7} {'weights MiB':>11} {'read/token MiB':>14} {'RSS decode':>10} {'RSS ppl':>8} "
          f"{'tok/s':>7} {'vs fp32':>7} {'limit':>7} {'of limit':>8} {'in matmuls':>10} {'other ms/tok':>12}")
    for row in rows:
        row["bandwidth_limit_tokens_per_s"] = bandwidth * 1e9 / row["streamed_bytes"]
        row["fraction_of_limit"] = row["decode_tokens_per_s"] / row["bandwidth_limit_tokens_per_s"]
        ppl = f"{row['perplexity']:8.3f}" if "perplexity" in row else f"{'-':>8}"
        delta = (f"{100 * (row['perplexity'] / fp32['perplexity'] - 1):+6.2f}%"
                 if fp32 and "perplexity" in row and "perplexity" in fp32 else f"{'-':>7}")
        speedup = f"{row['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:6.2f}x" if fp32 else f"{'-':>7}"
        print(f"{row['format']:<10} {ppl} {delta} {row['weight_bytes'] / MiB:11.1f} {row['streamed_bytes'] / MiB:14.1f} "
              f"{row['peak_rss_mib_decode']:10.0f} {row['peak_rss_mib']:8.0f} {row['decode_tokens_per_s']:7.1f} {speedup} "
              f"{row['bandwidth_limit_tokens_per_s']:7.1f} {row['fraction_of_limit']:8.0%} "
              f"{row['linear_share']:10.0%} {row['ms_per_token_outside_linear']:12.2f}")
    if args.out:
        record = {"command": "python -m benchmarks.quantize " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                  "read_bandwidth_gb_s": bandwidth, "model": args.model, "text": args.text,
                  "held_out": args.held_out, "window": args.window,
                  "stride": args.stride, "new_tokens": args.new_tokens, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
