"""`python -m gpt compare`: run folders side by side (config differences, final metrics, validation curves).

    python -m gpt compare runs/pretrain-a runs/pretrain-b
    python -m gpt compare runs/lr-* --out runs/lr-sweep

Each run folder's config.json and metrics.jsonl are read (nothing else: a run still in
progress, or one interrupted, compares as far as it got). The table has one column per
run and two kinds of rows:

    config fields that differ between the runs, as section.field (train.out_dir, the
    folder itself, is left out); a field one run lacks shows "-"
    final metrics, from metrics.jsonl:
        val loss / val ppl (last)   the last evaluation
        val loss / val ppl (best)   the lowest validation loss after step 0 that did not
                                    diverge (gpt.train.DIVERGED_FACTOR): best.pt's
        steps                       the last step logged
        tokens seen                 training tokens (summed over all processes)
        train seconds               time in optimizer steps up to the last evaluation
        train loss (last)           the last "train" record's loss
        val <metric> (last)         any other validation metric (accuracy, macro_f1, ...)

The table is printed, and written with its raw values to the output folder (`--out`,
by default a new runs/compare-<timestamp>): compare.md, compare.json, and, with
matplotlib, compare.png (every run's validation loss against steps and against tokens
seen). The output folder is never a run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cli_args
from .curves import evaluations, finite_points, read_metrics
from .errors import UserError
from .files import atomic_write, write_json, write_text
from .run_folder import new_run_folder
from .train import DIVERGED_FACTOR

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Not metrics: the record's place, the schedule, speed, and the validation tokens a language model scores.
NOT_VAL_METRICS = ("step", "split", "loss", "ppl", "lr", "tokens_per_s", "tokens", "tokens_seen")
OMITTED_CONFIG = ("train.out_dir",)  # each run's own folder: the column's name already


class Run:
    """One run folder: its flattened config (section.field -> value) and its metrics records."""

    def __init__(self, path: Path):
        if not path.exists():
            raise UserError(f"{path}: no such folder")
        if not path.is_dir():
            raise UserError(f"{path} is a file, not a run folder")
        missing = [name for name in ("config.json", "metrics.jsonl") if not (path / name).is_file()]
        if missing:
            raise UserError(f"{path}: not a training run's folder (no {' or '.join(missing)}; a run folder holds "
                            f"config.json and metrics.jsonl)")
        self.name = str(path)
        self.config = flatten(read_config(path / "config.json"))
        self.records = read_metrics(path / "metrics.jsonl")
        self.metrics = final_metrics(self.records)


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.json: an object of config sections."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected an object of config sections, got {type(config).__name__}")
    return config


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.001}} -> {"train.lr": 0.001}, through any depth of objects."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def best_evaluation(val: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation best.pt holds: the lowest finite loss after step 0 within DIVERGED_FACTOR of step 0's."""
    initial = next((r["loss"] for r in val if r["step"] == 0), math.inf)
    candidates = [r for r in val if r["step"] > 0 and isinstance(r.get("loss"), (int, float))
                  and math.isfinite(r["loss"]) and r["loss"] <= DIVERGED_FACTOR * initial]
    return min(candidates, key=lambda r: r["loss"], default=None)


def final_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics rows of the module docstring for one run (None where the run has no such value)."""
    train = [r for r in records if r["split"] == "train"]
    val = evaluations(records)
    last, best = (val[-1] if val else {}), best_evaluation(val) or {}
    tokens = [r["tokens"] for r in train if "tokens" in r] + [r["tokens_seen"] for r in val if "tokens_seen" in r]
    timed = [r for r in val if r.get("tokens_seen") and r.get("tokens_per_s")]
    metrics = {
        "val loss (last)": last.get("loss"),
        "val loss (best)": best.get("loss"),
        "val ppl (last)": last.get("ppl"),
        "val ppl (best)": best.get("ppl"),
        "steps": max((r["step"] for r in records), default=None),
        "tokens seen": max(tokens, default=None),
        # val records hold tokens/s over the run so far: tokens seen / training seconds
        "train seconds": timed[-1]["tokens_seen"] / timed[-1]["tokens_per_s"] if timed else None,
        "train loss (last)": train[-1].get("loss") if train else None,
    }
    for key, value in last.items():
        if key not in NOT_VAL_METRICS and isinstance(value, (int, float)):
            metrics[f"val {key} (last)"] = value
    return metrics


def comparison(runs: list[Run]) -> dict[str, Any]:
    """compare.json: the runs in order; the config fields that differ and every metric, each as
    {run: value} (a run without the config field is left out; a metric a run has no value for is None)."""
    fields = sorted({name for run in runs for name in run.config} - set(OMITTED_CONFIG))
    config = {name: {run.name: run.config[name] for run in runs if name in run.config} for name in fields}
    differing = {name: values for name, values in config.items()
                 if len(values) < len(runs) or len({json.dumps(v) for v in values.values()}) > 1}
    rows = list(dict.fromkeys(row for run in runs for row in run.metrics))
    return {"runs": [run.name for run in runs], "config": differing,
            "metrics": {row: {run.name: run.metrics.get(row) for run in runs} for row in rows}}


def config_cell(value: Any) -> str:
    """A config value as the command line writes it: text as is, anything else as JSON (true, 0.001, null)."""
    return value if isinstance(value, str) and value else json.dumps(value)


def metric_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.5g}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """Header row, then one row per differing config field and per metric: [name, value per run...]."""
    runs = result["runs"]
    rows = [["", *runs]]
    rows += [[name, *(config_cell(values[run]) if run in values else "-" for run in runs)]
             for name, values in result["config"].items()]
    rows += [[name, *(metric_cell(values[run]) for run in runs)] for name, values in result["metrics"].items()]
    return rows


def text_table(rows: list[list[str]]) -> str:
    """Aligned columns: names left, values right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown_table(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def validation_curves_figure(runs: list[Run]) -> Figure:
    """compare.png: 12 x 4.5 inches, every run's validation loss against steps and against tokens seen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(12, 4.5), layout="tight")
    FigureCanvasAgg(figure)
    by_step, by_tokens = figure.subplots(1, 2)
    for number, run in enumerate(runs):
        val = evaluations(run.records)
        style = {"color": f"C{number % 10}", "marker": "o", "markersize": 3, "label": run.name}
        by_step.plot(*finite_points(val, "step", "loss"), **style)
        by_tokens.plot(*finite_points(val, "tokens_seen", "loss"), **style)
    for axes, xlabel in ((by_step, "step"), (by_tokens, "tokens seen")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation loss")
        axes.legend(fontsize="small")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    return figure


def write_comparison(runs: list[Run], out_dir: Path) -> list[Path]:
    """compare.json, compare.md and (with matplotlib) compare.png in `out_dir`; returns the paths written."""
    result = comparison(runs)
    write_json(out_dir / "compare.json", result)
    write_text(out_dir / "compare.md", markdown_table(table_rows(result)))
    written = [out_dir / "compare.json", out_dir / "compare.md"]
    try:
        figure = validation_curves_figure(runs)
    except ImportError:
        print("[compare.png not drawn: matplotlib is not installed (pip install 'gpt[plot]')]", file=sys.stderr)
        return written
    atomic_write(out_dir / "compare.png", lambda f: figure.savefig(f, format="png", dpi=100))
    return [*written, out_dir / "compare.png"]


def compare_cli(argv: list[str]) -> int:
    """`python -m gpt compare RUN [RUN ...] [--out DIR]`."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt compare",
        description="Run folders side by side: the config fields that differ, final metrics from metrics.jsonl, "
                    "and every run's validation curve. Prints the table and writes compare.md, compare.json and "
                    "compare.png.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with config.json and metrics.jsonl)")
    parser.add_argument("--out", type=cli_args.output_folder, default=None,
                        help="folder for compare.md, compare.json, compare.png (default: a new runs/compare-<timestamp>; "
                             "never a run folder)")
    args = parser.parse_args(argv)
    runs = [Run(path) for path in args.runs]  # every folder checked before anything is written
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{', '.join(repeated)}: given more than once")
    out_dir = args.out or new_run_folder("compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(text_table(table_rows(comparison(runs))))
    written = write_comparison(runs, out_dir)
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0
