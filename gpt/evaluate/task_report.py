"""The report of a multiple-choice evaluation (`python -m gpt evaluate --task ... --report DIR`).

    report.json      the summary evaluate prints: metrics, and for MMLU accuracy per category and subject
    report.md        the same as tables, for a reader
    categories.png   MMLU only: accuracy per category as bars, with chance (one in four) marked
                     (needs matplotlib, the `plot` extra; without it the chart is skipped with a note)

Every file is written atomically: a failed or interrupted run leaves no half-written report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..files import atomic_target, write_json, write_text

CHANCE = 0.25  # four choices per MMLU question


def write_task_report(folder: Path, summary: dict[str, Any]) -> list[Path]:
    """report.json, report.md and (MMLU, with matplotlib) categories.png in `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", summary)
    write_text(folder / "report.md", format_markdown(summary))
    written = [folder / "report.json", folder / "report.md"]
    if summary.get("categories"):
        chart = write_category_chart(summary, folder / "categories.png")
        written += [chart] if chart else []
    return written


def format_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: the run's settings, the metrics, then accuracy per category and subject."""
    settings = ", ".join(f"{key} {summary[key]}" for key in ("model", "format", "shots", "seed", "data")
                         if summary.get(key) is not None)
    speed = summary["items"] / summary["seconds"] if summary.get("seconds") else 0.0
    lines = [f"# {summary['task']}: {summary['items']} items", "", settings, "",
             f"{summary['seconds']} s, {speed:.2f} items/s", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {summary[name]:.4f} |" for name in ("acc", "acc_norm", "acc_per_token")]
    for group in ("categories", "subjects"):
        if summary.get(group):
            lines += ["", f"| {group[:-1] if group == 'subjects' else 'category'} | accuracy | questions |",
                      "|---|---:|---:|"]
            lines += [f"| {name} | {entry['accuracy']:.4f} | {entry['questions']} |"
                      for name, entry in summary[group].items()]
    return "\n".join(lines) + "\n"


def write_category_chart(summary: dict[str, Any], path: Path) -> Path | None:
    """Accuracy per category and overall as a bar chart PNG at `path`; None (with a note) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"[no matplotlib: {path.name} not drawn; pip install 'gpt[plot]' for the chart]", file=sys.stderr)
        return None
    names = [*summary["categories"], "overall"]
    entries = [*summary["categories"].values(), summary["overall"]]
    figure = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(names, [entry["accuracy"] for entry in entries], color=["C0"] * (len(names) - 1) + ["C1"])
    axes.bar_label(bars, labels=[f"{entry['accuracy']:.3f}\n({entry['questions']})" for entry in entries],
                   fontsize=8)
    axes.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label=f"chance ({CHANCE})")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title(f"MMLU, {summary.get('model', 'model')}: {summary.get('shots', 0)}-shot, "
                   f"{summary.get('format', '')}")
    axes.legend(loc="upper right")
    with atomic_target(path) as target:
        figure.savefig(target, dpi=100, format="png")
    return path
