"""The lines of the GPU check's summary (benchmarks/gpu_check.sh), one per measurement, ready for BENCHMARKS.md.

    python -m benchmarks.gpu_check_report bench BENCH.json
        every training row of a `python -m gpt bench --out` report (tokens/s, step time, MFU against the
        measured and the published peak), the vocabulary padding's speed-up (ours-pad64 / ours) and ours
        against transformers
    python -m benchmarks.gpu_check_report run LABEL RUN_DIR
        one pretraining run from its metrics.jsonl: steps, last losses, the median tokens/s, step time and MFU
        of the steps after the first logged one (compilation, warm-up), and the peak memory the training
        records carry (rank 0's: torch's allocated peak on a GPU, the peak resident set elsewhere)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

WARM_UP_RECORDS = 1  # logged training records left out of the medians: the first step compiles and warms up


def bench_lines(path: Path) -> list[str]:
    """The bench report's training measurements, one line each."""
    report = json.loads(path.read_text())
    peaks = report["peak_flops"]
    published = peaks.get("published") or {}
    lines = []
    for precision, measured in peaks["measured"].items():
        known = f", published {published[precision] / 1e12:.4g}" if precision in published else ""
        lines.append(f"bench matmul peak {precision}: measured {measured / 1e12:.4g} TFLOP/s{known}")
    for config, section in report["configs"].items():
        rows = section.get("train", [])
        for row in rows:
            speed = row.get("tokens_per_s")
            if speed is None:
                continue
            mfu = f"MFU {row['mfu']:.1%} of the measured peak"
            if row.get("mfu_published") is not None:
                mfu += f", {row['mfu_published']:.1%} of the published"
            compiled = f", compile {row['compile_s']:.0f} s" if row.get("compile_s") is not None else ""
            lines.append(f"bench {config} {row['contender']} {row['precision']} {row['mode']}: {speed:,.0f} tokens/s, "
                         f"{row['step_ms']:.1f} ms/step, {mfu}{compiled}")
        lines += ratio_lines(config, section, rows)
    return lines


def ratio_lines(config: str, section: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """ours-pad64 / ours (the padded vocabulary against GPT-2's) and each pair the bench compares, per variant."""
    vocab = {name: info["vocab_size"] for name, info in section.get("contenders", {}).items()}
    speed = {(r["contender"], r["precision"], r["mode"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    lines = []
    for (contender, precision, mode), padded in speed.items():
        plain = speed.get(("ours", precision, mode))
        if contender == "ours-pad64" and plain:
            lines.append(f"bench {config} vocabulary {vocab.get('ours-pad64', '?'):,} / {vocab.get('ours', '?'):,} "
                         f"(ours-pad64 / ours) {precision} {mode}: {padded / plain:.3f}x tokens/s")
    for ratio in section.get("train_ratios", []):
        if "tokens_per_s_ratio" in ratio:
            lines.append(f"bench {config} {ratio['contender']} / {ratio['reference']} {ratio['precision']} "
                         f"{ratio['mode']}: {ratio['tokens_per_s_ratio']:.2f}x tokens/s")
    return lines


def run_line(label: str, run_dir: Path) -> str:
    """One pretraining run in a line (see the module docstring)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return f"{label}: no metrics.jsonl in {run_dir}"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    parts = [f"{train[-1]['step'] if train else 0} steps"]
    if val:
        parts.append(f"val loss {val[-1]['loss']:.4f} at step {val[-1]['step']}")
    if train:
        parts.append(f"train loss {train[-1]['loss']:.4f}")
    steady = train[WARM_UP_RECORDS:] or train
    if steady:
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
        parts.append(f"{tokens_per_s:,.0f} tokens/s (median of steps {steady[0]['step']}-{steady[-1]['step']})")
        tokens_per_step = _tokens_per_step(train)
        if tokens_per_step:
            parts.append(f"{1000 * tokens_per_step / tokens_per_s:.1f} ms/step of {tokens_per_step:,} tokens")
        parts.append(f"MFU {statistics.median(r['mfu'] for r in steady):.1%} of the measured peak")
    peaks = [r["peak_memory_mib"] for r in train if "peak_memory_mib" in r]
    if peaks:
        parts.append(f"peak memory {max(peaks):,.0f} MiB")
    return f"{label}: " + ", ".join(parts)


def _tokens_per_step(train: list[dict[str, Any]]) -> int | None:
    """Tokens of one optimizer step, from two consecutive records' running token counts."""
    for before, after in zip(train, train[1:]):
        if after["step"] > before["step"] and "tokens" in after and "tokens" in before:
            return (after["tokens"] - before["tokens"]) // (after["step"] - before["step"])
    return None


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "bench" and len(rest) == 1:
        print("\n".join(bench_lines(Path(rest[0]))))
    elif command == "run" and len(rest) == 2:
        print(run_line(rest[0], Path(rest[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
