"""How much of a CPU training step the memory allocator costs, for our GPT and for transformers' GPT-2.

glibc's malloc hands every block over 32 MB straight to the kernel (a fresh mmap) and
gives it back on free, so each big temporary of a training step (logits, their float32
copies, a weight gradient) is paid again in page faults: the kernel maps and zeroes
every 4 KiB page on first touch. `mallopt(M_MMAP_MAX, 0)` plus a huge trim threshold
makes glibc keep and reuse that memory instead (`gpt.runtime.keep_freed_memory`, which
our trainer applies on CPU unless `--train.keep_freed_memory false`).

The allocator is a setting of the whole process, so each setting runs in its own
process; inside one, our model and transformers' run interleaved round by round (the
same random batches, the same weights, each with the optimizer `gpt bench` gives it),
so the ratio between them holds even where absolute times drift. For each contender it
prints the median step time, the system (kernel) time per step and the minor page
faults per step.

    python -m benchmarks.allocator                       # tiny, fp32 and bf16, both allocator settings
    python -m benchmarks.allocator --config small --rounds 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt.runtime import keep_freed_memory


def measure(config_name: str, rounds: int, steps: int) -> dict:
    """Time our GPT and transformers' GPT-2 in this process, interleaved; returns per-contender figures."""
    import torch

    from gpt.bench.contenders import (
        BENCH_CONFIGS, CONTENDERS, build_trainee, export_for_transformers, quiet_transformers,
    )
    from gpt.bench.timing import token_batches, train_step_function

    quiet_transformers()
    bench_config, device = BENCH_CONFIGS[config_name], torch.device("cpu")
    batches = token_batches(steps, bench_config.batch_size(device), bench_config, seed=0, device=device)
    with tempfile.TemporaryDirectory() as folder:
        hf_folders = {"gpt2": export_for_transformers(bench_config, "gpt2", 0, Path(folder))}
        trainees = {name: build_trainee(CONTENDERS[name], bench_config, 0, hf_folders, device)
                    for name in ("ours", "hf-gpt2")}
        results = {}
        for precision in ("fp32", "bf16"):
            step_functions = {name: train_step_function(t, precision, "eager", device) for name, t in trainees.items()}
            for step in step_functions.values():  # warm-up: first-touch costs, kernel selection
                for x, y in batches[:2]:
                    step(x, y)
            timings = {name: {"step_s": [], "sys_s": [], "faults": []} for name in step_functions}
            for _ in range(rounds):
                for name, step in step_functions.items():
                    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    for x, y in batches:
                        step(x, y)
                    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
                    timings[name]["step_s"].append(elapsed / steps)
                    timings[name]["sys_s"].append((after.ru_stime - before.ru_stime) / steps)
                    timings[name]["faults"].append((after.ru_minflt - before.ru_minflt) / steps)
            results[precision] = {name: {key: statistics.median(values) for key, values in t.items()}
                                  for name, t in timings.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="a config of `gpt bench` (default tiny)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    parser.add_argument("--child", choices=["glibc", "keep-freed"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one allocator setting, in this process; the parent reads the JSON line
        if args.child == "keep-freed" and not keep_freed_memory():
            raise SystemExit("mallopt refused the settings (not glibc?)")
        print(json.dumps(measure(args.config, args.rounds, args.steps)))
        return

    print(f"config {args.config}, {args.rounds} rounds of {args.steps} steps, medians per step")
    print(f"{'allocator':12s} {'precision':9s} {'contender':9s} {'step ms':>8s} {'sys ms':>7s} {'faults':>8s}  ours faster")
    for setting in ("glibc", "keep-freed"):
        command = [sys.executable, "-m", "benchmarks.allocator", "--child", setting, "--config", args.config,
                   "--rounds", str(args.rounds), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results = json.loads(output.strip().splitlines()[-1])
        for precision, by_contender in results.items():
            ratio = by_contender["hf-gpt2"]["step_s"] / by_contender["ours"]["step_s"]
            for name, figures in by_contender.items():
                print(f"{setting:12s} {precision:9s} {name:9s} {1000 * figures['step_s']:8.0f} "
                      f"{1000 * figures['sys_s']:7.0f} {figures['faults']:8.0f}"
                      + (f"  {ratio:.2f}x" if name == "hf-gpt2" else ""))


if __name__ == "__main__":
    main()
