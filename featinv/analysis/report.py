"""Small HTML reports and matplotlib plots for the analysis commands (files beside the report)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def line_plot(path: Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str) -> None:
    """One line per series over ``x``, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        ax.plot(list(x), list(values), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_plot(
    path: Path,
    groups: dict[str, dict[str, float]],
    metrics: Sequence[str],
    intervals: dict[str, dict[str, Sequence[float]]] | None = None,
) -> None:
    """Grouped bars: one panel per metric, one bar per group (method); with ``intervals``
    ({group: {metric: (low, high)}}) each bar that has one gets it as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        names = list(groups)
        heights = [groups[n][metric] for n in names]
        below, above = [], []
        for name, height in zip(names, heights, strict=True):
            low, high = (intervals or {}).get(name, {}).get(metric, (height, height))
            below.append(height - low)
            above.append(high - height)
        ax.bar(
            range(len(names)),
            heights,
            yerr=[below, above] if any(below) or any(above) else None,
            capsize=4,
            color=["C0", "C1", "C2", "C3"][: len(names)],
        )
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(metric, fontsize=9)
    if intervals:
        fig.suptitle("error bars: 95% confidence intervals", fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def text_table(rows: Sequence[Sequence[str]], width: int = 24) -> str:
    """Rows of text cells as aligned terminal lines: the first column as wide as its longest cell,
    the others ``width`` characters, or wider where a cell is (always one space between columns)."""
    columns = max(len(row) for row in rows)
    widths = [max(len(row[0]) for row in rows) + 1] + [
        max([width] + [len(row[i]) + 1 for row in rows if i < len(row)]) for i in range(1, columns)
    ]
    lines = ("".join(f"{cell:<{w}}" for cell, w in zip(row, widths[: len(row)], strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def write_report(out: Path, title: str, intro: str, blocks: Sequence[tuple[str, Any]], data: dict[str, Any]) -> None:
    """``report.html`` with headed blocks (an image file name, a table as {row: {column: value}}, or
    text) and ``<name>.json`` with ``data``."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{padding:3px 10px}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
    ]
    for heading, content in blocks:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, str) and content.endswith(".png"):
            parts.append(f"<img src='{html.escape(content)}'>")
        elif isinstance(content, dict):
            columns = list(next(iter(content.values())).keys()) if content else []
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            rows = "".join(
                f"<tr><td>{html.escape(str(name))}</td>"
                + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                + "</tr>"
                for name, row in content.items()
            )
            parts.append(f"<table border='1' cellspacing='0'><tr><th></th>{head}</tr>{rows}</table>")
        else:
            parts.append(f"<p>{html.escape(str(content))}</p>")
    parts.append("</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text("\n".join(parts))
    (out / "metrics.json").write_text(json.dumps(data, indent=2) + "\n")


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
