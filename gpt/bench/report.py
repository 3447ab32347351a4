"""Turning timings into the report: JSON rows, ours-over-reference ratios, the terminal tables
(and the progress lines printed while measuring).

Every speed is the median over rounds, and every ratio is a ratio of medians.
"""

from __future__ import annotations

import statistics
import sys
from typing import TYPE_CHECKING, Any

from .contenders import REFERENCE

if TYPE_CHECKING:
    from .timing import GenerationRun, TrainVariant


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def train_row(variant: TrainVariant, tokens_per_step: int, flops: float, peaks: dict[str, Any]) -> dict[str, Any]:
    """One variant's training figures; `flops` per token, `peaks` as the report's "peak_flops" section."""
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
    """One contender's generation figures at one batch size, and whether its tokens equal its reference's."""
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
        lines += _training_table(section["train"], section["train_ratios"])
    if "generate" in section:
        lines += _generation_table(section["generate"], section["generate_ratios"])
    return "\n".join(lines)


def _training_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[str]:
    header = ["prec", "mode", "tok/s", "step ms", "MFU", "MFU pub", "peak MiB", "compile s"]
    lines = [f"  {'training':<11} {header[0]:<5} {header[1]:<8} " + " ".join(f"{h:>9}" for h in header[2:])]
    for row in rows:
        cells = [
            _cell(row.get("tokens_per_s"), ",.0f"),
            _cell(row.get("step_ms"), ".1f"),
            _cell(row.get("mfu"), ".1%"),
            _cell(row.get("mfu_published"), ".1%"),
            _cell(row.get("peak_memory_mib"), ",.0f"),
            _cell(row.get("compile_s"), ".1f"),
        ]
        lines.append(f"  {row['contender']:<11} {row['precision']:<5} {row['mode']:<8} " + " ".join(cells))
    for ratio in ratios:
        measured = [f"{label} {ratio[key]:.2f}x" for key, label in
                    (("tokens_per_s_ratio", "tokens/s"), ("peak_memory_ratio", "peak memory")) if key in ratio]
        pair = f"{ratio['contender']} / {ratio['reference']}, {ratio['precision']} {ratio['mode']}"
        lines.append(f"  ratio {pair}: " + ", ".join(measured))
    return lines


def _generation_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'generation':<11} {'batch':>5} {'tok/s':>9}  tokens as the reference's"]
    for row in rows:
        same = ""
        if "identical_to_reference" in row:
            same = "identical" if row["identical_to_reference"] else f"{row['matching_token_fraction']:.0%} equal"
        speed = _cell(row["tokens_per_s"], ",.1f")
        lines.append(f"  {row['contender']:<11} {row['batch_size']:>5} {speed}  {same}")
    for ratio in ratios:
        lines.append(
            f"  ratio {ratio['contender']} / {ratio['reference']}, batch {ratio['batch_size']}: "
            f"tokens/s {ratio['tokens_per_s_ratio']:.2f}x"
        )
    return lines


def _cell(value: float | None, spec: str, width: int = 9) -> str:
    """`value` formatted by `spec`, right-aligned in `width` characters; '-' when there is no value."""
    return (format(value, spec) if value is not None else "-").rjust(width)
