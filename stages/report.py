"""The summary table every ``distil evaluate`` prints and writes as ``summary.txt`` (the
table ``make demo`` shows): one row per model or cascade."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

LIKENESS = {"kl_to_teacher": ("KL to teacher", "{:.3f}"), "top1_agreement": ("top-1 agree", "{:.1%}"),
            "greedy_match": ("greedy match", "{:.1%}"), "speedup": ("speed-up", "{:.2f}x")}  # fmt: skip
"""LM models compared with a teacher (``evaluate --teacher``): metric -> (column, format)."""


def summary_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="distil: models on the test split")
    likeness = [k for k in LIKENESS if any(k in m for m in results.values())]
    for col in ("model", "accuracy", "ECE", "params", "ms / 1k rows", "teacher rate", *(LIKENESS[k][0] for k in likeness)):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in results.items():
        table.add_row(
            name,
            f"{m['accuracy']:.4f}",
            f"{m['ece']:.4f}" if "ece" in m else "-",
            f"{m['params']:,}" if "params" in m else "-",
            f"{m['ms_per_1k_rows']:.2f}",
            f"{m['teacher_rate']:.1%}" if "teacher_rate" in m else "-",
            *(LIKENESS[k][1].format(m[k]) if k in m else "-" for k in likeness),
        )
    return table


def write_summary(work: Path, results: dict[str, dict[str, Any]], console: Console | None) -> None:
    rendered = Console(record=True, width=140, file=io.StringIO())
    rendered.print(summary_table(results))
    (work / "summary.txt").write_text(rendered.export_text())
    # a pipe or a DVC log is 80 columns to rich: the likeness columns need more
    (console or Console(width=None if sys.stdout.isatty() else 140)).print(summary_table(results))
