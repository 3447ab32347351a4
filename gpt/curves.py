"""Training curves: a run folder's metrics.jsonl read back, and drawn as curves.png.

    records = read_metrics(run_dir / "metrics.jsonl")   # every record, checked, in order
    evaluations(records)                                # the "val" records, each with its tokens_seen
    plot_run_curves(run_dir)                            # run_dir/curves.png; None without matplotlib

The training loop calls `plot_run_curves` when a run ends (finished, stopped early,
interrupted by a signal, stopped by a non-finite loss; not after a second Ctrl-C, which
asks to be out at once). curves.png has
three panels: training and validation loss against optimizer steps, the same against
tokens seen, and the learning rate against steps. Non-finite losses (a diverged run)
are left out of the plot. matplotlib is imported only here, when a plot is drawn; without
it (`pip install 'gpt[plot]'`) no file is written.

A last line without its newline that is not JSON is what a run killed mid-write leaves:
it is skipped, as a resumed run drops it (gpt.metrics_log); any other bad line is a
`UserError` naming the file and the line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import atomic_write, json_lines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_NAME = "curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, each an object with an integer "step" and a "split"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (a training run writes its metrics.jsonl in its run folder)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    last_line = text.rpartition("\n")[2]
    if last_line.strip() and not _is_json(last_line):  # cut short by a kill mid-write
        text = text[: len(text) - len(last_line)]
    records = []
    for number, record in json_lines(path, text):
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                and isinstance(record.get("split"), str)):
            raise UserError(f'{path}, line {number}: a metrics record is an object with an integer "step" and '
                            f'a "split", got {str(record)[:80]}')
        records.append(record)
    return records


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def evaluations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "val" records, each with "tokens_seen" (training tokens before that evaluation). Runs from before
    val records carried it take it from the "train" record of the same step ("tokens"), or 0 at step 0;
    an evaluation with neither has none."""
    train_tokens = {r["step"]: r["tokens"] for r in records if r["split"] == "train" and "tokens" in r}
    train_tokens.setdefault(0, 0)
    found = []
    for record in records:
        if record["split"] == "val":
            tokens_seen = record.get("tokens_seen", train_tokens.get(record["step"]))
            found.append({**record, **({"tokens_seen": tokens_seen} if tokens_seen is not None else {})})
    return found


def finite_points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records that have both keys, with a finite y (a diverged loss is left out)."""
    points = [(r[x], r[y]) for r in records if x in r and isinstance(r.get(y), (int, float)) and math.isfinite(r[y])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run_curves(run_dir: str | Path) -> Path | None:
    """run_dir/curves.png (written atomically) from run_dir/metrics.jsonl; returns its path, or None when
    matplotlib is not installed (with a one-line note) or nothing was logged yet."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return None
    try:
        figure = run_curves_figure(records, title=run_dir.name)
    except ImportError:
        print(f"[{CURVES_NAME} not drawn: matplotlib is not installed (pip install 'gpt[plot]')]", file=sys.stderr)
        return None
    path = run_dir / CURVES_NAME
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
    return path


def run_curves_figure(records: list[dict[str, Any]], title: str) -> Figure:
    """The figure `plot_run_curves` saves: 15 x 4 inches, three panels (loss against steps, loss against
    tokens seen, learning rate against steps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    train = [r for r in records if r["split"] == "train"]
    val = evaluations(records)
    figure = Figure(figsize=(15, 4), layout="tight")
    FigureCanvasAgg(figure)
    by_step, by_tokens, lr = figure.subplots(1, 3)
    for axes, train_x, val_x, xlabel in ((by_step, "step", "step", "step"),
                                         (by_tokens, "tokens", "tokens_seen", "tokens seen")):
        axes.plot(*finite_points(train, train_x, "loss"), color="C0", label="train")
        axes.plot(*finite_points(val, val_x, "loss"), color="C1", marker="o", markersize=3, label="validation")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("loss")
        axes.legend()
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    lr.plot(*finite_points(train, "step", "lr"), color="C2")
    lr.set_xlabel("step")
    lr.set_ylabel("learning rate")
    figure.suptitle(title)
    return figure
