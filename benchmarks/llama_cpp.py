"""llama.cpp as the real client of our GGUF export: next-token agreement with our model, and its decode speed.

For each `--model` (anything `--model` takes: a known name, a GGUF file, a checkpoint or run
folder) and each `--types` entry, the model is exported with `python -m gpt convert --to gguf`
and loaded by llama.cpp through llama-cpp-python. Two measurements:

* agreement: teacher-forced next-token top-1 agreement between llama.cpp and our float32
  model at every position of the first `--tokens` tokens of data/botchan.txt (cut into
  windows of the model's context length when that is shorter), plus the mean |logit
  difference|. The issue's target: at least 0.98 for f16 and q8_0. Two more columns split
  the disagreement into its causes: our model reading the exported file (the rounded
  weights, float32 arithmetic) against our float32 model measures the weight rounding
  alone; llama.cpp against that model measures llama.cpp's own arithmetic (for q8_0/q4_0
  it rounds the activations to 8-bit blocks inside its matmuls, and keeps an f16 KV cache).
* speed: llama.cpp's batch-1 decode, `--new-tokens` greedy tokens after an 8-token prompt
  (fewer when the context is shorter), `--threads` threads; the median of `--repeats` runs
  in tokens/s, with the load average beside it. This is the part to re-run on a quiet
  machine (`--only speed`): on a shared one, llama.cpp's threads wait for each other at
  every op, and 2 threads can decode a hundred times slower than 1.

Results are printed as a table and written as JSON (CPU model, command, versions) under
benchmarks/results/.

    pip install --no-binary llama-cpp-python llama-cpp-python     # with CMAKE_ARGS="-DGGML_NATIVE=OFF"
    python -m benchmarks.llama_cpp --model smollm2-135m-instruct --model runs/my-gpt2-run
    python -m benchmarks.llama_cpp --model smollm2-135m-instruct --only speed --types q8_0,q4_0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpt.bench.cli import cpu_name
from gpt.files import write_json
from gpt.weights import convert_cli, load_model_and_tokenizer, load_pretrained

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 8

EPILOG = """\
examples:
  python -m benchmarks.llama_cpp --model smollm2-135m-instruct --model /work/bench-models/gpt2-botchan
  python -m benchmarks.llama_cpp --model smollm2-135m-instruct --only speed --threads 2 --repeats 5
  python -m benchmarks.llama_cpp --model smollm2-135m-instruct --only agreement --types f16 --tokens 256
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a model to export and compare (repeatable)")
    parser.add_argument("--types", default="f16,q8_0,q4_0", help="GGUF types, comma-separated (default: %(default)s)")
    parser.add_argument("--only", choices=("agreement", "speed"), default=None, help="run one measurement only")
    parser.add_argument("--text", type=Path, default=REPO / "data" / "botchan.txt")
    parser.add_argument("--tokens", type=int, default=512, help="positions compared for agreement (default: 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per speed run (default: 128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per type; the median is reported")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/llama-cpp-DATE.json)")
    args = parser.parse_args()

    import llama_cpp  # noqa: F401  (fail early, before exporting anything)

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.llama_cpp", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "settings": {"threads": args.threads, "tokens": args.tokens, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "text": str(args.text.relative_to(REPO)) if args.text.is_relative_to(REPO)
                     else str(args.text)},
        "models": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="llama-cpp-bench-") as tmp:
        for source in args.model:
            results["models"][source] = measure_model(source, args.types.split(","), Path(tmp), args)
    print_table(results)
    out = args.out or REPO / "benchmarks" / "results" / f"llama-cpp-{datetime.date.today().isoformat()}.json"
    write_json(out, results)
    print(f"wrote {out}")


def measure_model(source: str, types: list[str], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export `source` once per type and measure llama.cpp on each file."""
    loaded = load_model_and_tokenizer(source)
    model, config = loaded.model.eval(), loaded.model.config
    text = args.text.read_text(encoding="utf-8-sig")
    ids = loaded.tokenizer.encode(text[: 20 * args.tokens])[: args.tokens]
    entry: dict[str, Any] = {"architecture": "gpt2" if config.pos_emb == "learned" else "llama",
                             "parameters": model.num_parameters(), "context_length": config.context_length,
                             "types": {}}  # fmt: skip
    window = min(config.context_length, len(ids))  # llama.cpp sizes its buffers by the context: no larger than needed
    our_logits = teacher_forced_logits_ours(model, ids, window) if args.only != "speed" else None
    for gguf_type in types:
        path = tmp / f"{Path(source).stem}.{gguf_type}.gguf"
        with contextlib.redirect_stdout(io.StringIO()):
            convert_cli([source, "--to", "gguf", "--type", gguf_type, "--out", str(path)])
        row: dict[str, Any] = {"file_mib": round(path.stat().st_size / 2**20, 1)}
        if args.only != "speed":
            theirs = llama_cpp_logits(path, ids, window, args.threads)
            from_file = teacher_forced_logits_ours(load_pretrained(path), ids, window)
            row.update(agreement(theirs, our_logits))
            row["ours_from_file_vs_ours"] = agreement(from_file, our_logits)["agreement"]
            row["llama_cpp_vs_ours_from_file"] = agreement(theirs, from_file)["agreement"]
        if args.only != "agreement":
            row.update(decode_speed(path, ids, config.context_length, args))
        entry["types"][gguf_type] = row
    return entry


def windows(ids: list[int], context_length: int) -> list[list[int]]:
    """`ids` cut into consecutive windows of at most `context_length` tokens, each evaluated from scratch."""
    return [ids[i : i + context_length] for i in range(0, len(ids), context_length)]


def teacher_forced_logits_ours(model: torch.nn.Module, ids: list[int], window: int) -> list[torch.Tensor]:
    """Our float32 logits (T, V) for every window of `ids`."""
    with torch.no_grad():
        return [model(torch.tensor([w]))[0] for w in tqdm(windows(ids, window), desc="ours")]


def llama_cpp_logits(path: Path, ids: list[int], window: int, threads: int) -> list[torch.Tensor]:
    """llama.cpp's logits (T, V) for every window of `ids`, each window evaluated from an empty cache."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)  # fmt: skip
    logits = []
    for window_ids in tqdm(windows(ids, window), desc=f"llama.cpp {path.name}"):
        llm.reset()
        llm.eval(window_ids)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(window_ids)], dtype=np.float32)))  # (T, V)
    llm.close()
    return logits


def agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, Any]:
    """Top-1 agreement and mean |logit difference| of `logits` against `reference`, over all windows."""
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference, strict=True))
    total = sum(len(a) for a in logits)
    difference = sum(float((a - b).abs().sum()) for a, b in zip(logits, reference)) / sum(a.numel() for a in logits)
    return {"agreement": round(same / total, 4), "positions": total, "mean_abs_logit_diff": round(difference, 4)}


def decode_speed(path: Path, ids: list[int], context_length: int, args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's batch-1 greedy decode speed after an 8-token prompt (median of `args.repeats` runs)."""
    import llama_cpp

    new_tokens = min(args.new_tokens, context_length - PROMPT_TOKENS)
    llm = llama_cpp.Llama(str(path), n_ctx=min(context_length, PROMPT_TOKENS + args.new_tokens),
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)  # fmt: skip
    rates = []
    for _ in tqdm(range(args.repeats), desc=f"decode {path.name}"):
        llm.reset()
        llm.eval(ids[:PROMPT_TOKENS])
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(new_tokens / (time.perf_counter() - start))
    llm.close()
    # With more runnable processes than cores, llama.cpp's threads wait for each other at every op's barrier:
    # measured here, 2 threads decoded at 3.5 tokens/s with a load average near 4, 1 thread at 630.
    return {"decode_tokens_per_s": round(statistics.median(rates), 1), "decode_runs": [round(r, 1) for r in rates],
            "new_tokens": new_tokens, "load_average_1min": round(os.getloadavg()[0], 2)}  # fmt: skip


def machine() -> dict[str, Any]:
    """The CPU model (from /proc/cpuinfo), the logical CPU count, the OS."""
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def versions() -> dict[str, str]:
    """Versions of llama-cpp-python, its llama.cpp build (system info line), torch, gguf, python."""
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system_info": system_info.decode() if isinstance(system_info, bytes) else str(system_info),
            "torch": torch.__version__, "gguf": importlib.metadata.version("gguf"),
            "python": platform.python_version()}  # fmt: skip


def print_table(results: dict[str, Any]) -> None:
    print(f"\nllama.cpp {results['versions']['llama_cpp_python']} on {results['machine']['cpu']}, "
          f"{results['settings']['threads']} threads")
    print(f"{'model':<28} {'type':<6} {'MiB':>7} {'top-1 agree':>11} {'|dlogit|':>9} {'file/ours':>9} "
          f"{'llama/file':>10} {'decode tok/s':>12}")
    for source, entry in results["models"].items():
        for gguf_type, row in entry["types"].items():
            agree = f"{row['agreement']:.4f}" if "agreement" in row else "-"
            diff = f"{row['mean_abs_logit_diff']:.4f}" if "mean_abs_logit_diff" in row else "-"
            speed = f"{row['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in row else "-"
            file_vs_ours = f"{row['ours_from_file_vs_ours']:.4f}" if "ours_from_file_vs_ours" in row else "-"
            llama_vs_file = f"{row['llama_cpp_vs_ours_from_file']:.4f}" if "llama_cpp_vs_ours_from_file" in row else "-"
            name = Path(source).name[:28]
            print(f"{name:<28} {gguf_type:<6} {row['file_mib']:>7.1f} {agree:>11} {diff:>9} {file_vs_ours:>9} "
                  f"{llama_vs_file:>10} {speed:>12}")


if __name__ == "__main__":
    main()
