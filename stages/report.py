"""The summary table every ``distil evaluate`` prints and writes as ``summary.txt`` (the
table ``make demo`` shows): one row per model or cascade; under it, with two models or more,
the paired comparison of every pair (``stages.metrics.all_pairs``)."""

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
    _show(work, summary_table(results), console, append=False)


def paired_table(pairs: list[dict[str, Any]]) -> Table:
    """``stages.metrics.all_pairs`` as a table: one row per pair of models."""
    table = Table(title="paired: accuracy difference A - B on the same items")
    for col in ("A", "B", "items", "A - B", "95% interval", "McNemar p", "inside the noise"):
        table.add_column(col, justify="left" if col in ("A", "B") else "right")
    for p in pairs:
        if not p["items"]:
            table.add_row(p["a"], p["b"], "0", "-", "-", "-", "-")
            continue
        lo, hi = p["interval"]
        table.add_row(p["a"], p["b"], str(p["items"]), f"{p['diff']:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]",
                      f"{p['mcnemar']['p_value']:.3g}", "no" if p["excludes_zero"] else "yes")  # fmt: skip
    return table


def write_paired(work: Path, scores: dict[str, Any], console: Console | None, seed: int = 0) -> list[dict[str, Any]]:
    """Every pair of models scored on the same items (``scores``: name -> per-item score, NaN where
    unscored) into ``paired.json``, and its table printed and appended to ``summary.txt``; nothing
    with fewer than two models."""
    from stages.artifacts import write_json
    from stages.metrics import all_pairs

    if len(scores) < 2:
        return []
    pairs = all_pairs(scores, seed=seed)
    write_json(work / "paired.json", pairs)
    _show(work, paired_table(pairs), console, append=True)
    return pairs


def _show(work: Path, table: Table, console: Console | None, *, append: bool) -> None:
    """``table`` into ``summary.txt`` (140 columns) and onto ``console`` (stdout when None)."""
    rendered = Console(record=True, width=140, file=io.StringIO())
    rendered.print(table)
    with open(work / "summary.txt", "a" if append else "w") as fh:
        fh.write(rendered.export_text())
    # a pipe or a DVC log is 80 columns to rich: the likeness columns need more
    (console or Console(width=None if sys.stdout.isatty() else 140)).print(table)
