"""The summary table every ``distil evaluate`` prints and writes as ``summary.txt`` (the
table ``make demo`` shows): one row per model or cascade."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def summary_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="distil: models on the test split")
    for col in ("model", "accuracy", "ECE", "params", "ms / 1k rows", "teacher rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in results.items():
        table.add_row(
            name,
            f"{m['accuracy']:.4f}",
            f"{m['ece']:.4f}" if "ece" in m else "-",
            f"{m['params']:,}" if "params" in m else "-",
            f"{m['ms_per_1k_rows']:.2f}",
            f"{m['teacher_rate']:.1%}" if "teacher_rate" in m else "-",
        )
    return table


def write_summary(work: Path, results: dict[str, dict[str, Any]], console: Console | None) -> None:
    rendered = Console(record=True, width=100, file=io.StringIO())
    rendered.print(summary_table(results))
    (work / "summary.txt").write_text(rendered.export_text())
    (console or Console()).print(summary_table(results))
