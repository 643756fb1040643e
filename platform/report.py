"""Tables and charts that jobs and benchmarks print and write (one formatter for all)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timfusion.tasks.imageio import atomic_write_bytes, atomic_write_text


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 4) -> str:
    """A fixed-width plain-text table."""
    cells = [[_cell(row.get(c, ""), digits) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: (repr(v) if isinstance(v, float) else v) for c, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=float) + "\n")


def bar_chart_grid(
    path: str | Path,
    values: dict[str, dict[str, float]],
    higher_is_better: dict[str, bool],
    title: str,
    highlight: Sequence[str] = (),
) -> None:
    """One horizontal bar chart per metric (methods sorted best first), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(values)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    methods = sorted({m for per in values.values() for m in per})
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.22 * len(methods) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        per = values[metric]
        ordered = sorted(per, key=lambda m: per[m], reverse=higher_is_better[metric])
        colours = ["tab:red" if m in highlight else "tab:blue" for m in ordered]
        ax.barh(range(len(ordered)), [per[m] for m in ordered], color=colours)
        ax.set_yticks(range(len(ordered)), ordered, fontsize=7)
        ax.invert_yaxis()
        arrow = "higher is better" if higher_is_better[metric] else "lower is better"
        ax.set_title(f"{metric} ({arrow})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
