"""Checks of a Parquet table: its parts against the manifest's ``parts`` and ``rows``, each
part's schema against the kind's, and one streamed pass over every batch that decodes it
and counts NaN / inf in float columns (list columns included). Only one batch is in memory
at a time, so a table of any size is checked in bounded memory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts import check_schema, is_optional
from stages.doctor.findings import Finding, first_line
from stages.errors import DistilError

BATCH_ROWS = 8192


def check_table(directory: Path, manifest: dict[str, Any], schema: pa.Schema | None, fix: str) -> tuple[int, list[Finding]]:
    """(rows read, findings) of the table in ``directory``; ``schema`` None checks no columns."""
    files = sorted(directory.glob("part-*.parquet"))
    findings = _parts(directory, manifest, files, fix)
    if not files:
        findings.append(Finding(directory, "holds no part-*.parquet files", fix))
    rows, nonfinite, first = 0, Counter(), {}
    for f in files:
        n, part_findings = _scan_part(f, schema, nonfinite, first, fix)
        rows += n
        findings += part_findings
    for column, count in nonfinite.items():
        findings.append(Finding(first[column], f"column '{column}' holds {count} NaN/inf value(s) in the table", fix))
    expected = manifest.get("rows")
    if expected is None:
        findings.append(Finding(directory, "the manifest records no row count", fix))
    elif expected != rows:
        findings.append(Finding(directory, f"the manifest says {expected} rows but the parts hold {rows}", fix))
    return rows, findings


def _parts(directory: Path, manifest: dict[str, Any], files: list[Path], fix: str) -> list[Finding]:
    """Parts the manifest lists that are gone, and parts on disk it does not list."""
    listed = manifest.get("parts")
    if listed is None:  # manifests before the parts list: nothing to compare
        return []
    names = {f.name for f in files}
    findings = [Finding(directory / p, "is listed in the manifest but missing", fix) for p in listed if p not in names]
    findings += [
        Finding(directory / p, "is a part the manifest does not list", f"delete it if it does not belong, or {fix}")
        for p in sorted(names - set(listed))
    ]
    return findings


def _scan_part(path: Path, schema: pa.Schema | None, nonfinite: Counter, first: dict[str, Path], fix: str) -> tuple[int, list[Finding]]:  # fmt: skip
    """Rows of one part, decoded batch by batch; non-finite float counts go into ``nonfinite``."""
    try:
        part = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        return 0, [Finding(path, f"is not a readable Parquet file ({first_line(exc)})", fix)]
    findings = [Finding(path, problem, fix) for problem in _schema_problems(part.schema_arrow, schema)]
    rows = 0
    try:
        for batch in part.iter_batches(batch_size=BATCH_ROWS):
            rows += batch.num_rows
            for name, column in zip(batch.schema.names, batch.columns, strict=True):
                bad = _count_nonfinite(column)
                if bad:
                    nonfinite[name] += bad
                    first.setdefault(name, path)
    except (pa.ArrowException, OSError) as exc:
        findings.append(Finding(path, f"is corrupt after {rows} rows ({first_line(exc)})", fix))
    return rows, findings


def _schema_problems(got: pa.Schema, required: pa.Schema | None) -> list[str]:
    """Missing columns and wrong types, judged by the same rule the stages' readers apply."""
    problems = []
    for field in required or []:
        if field.name not in got.names:
            if not is_optional(field):
                problems.append(f"has no column '{field.name}'")
            continue
        try:
            check_schema(got, pa.schema([field]), "")
        except DistilError:
            problems.append(f"column '{field.name}' has type {got.field(field.name).type}, expected {field.type}")
    return problems


def _count_nonfinite(array: pa.Array) -> int:
    """NaN and inf values of a float (or list-of-float) column; nulls are not counted."""
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    if not pa.types.is_floating(array.type):
        return 0
    values = array.drop_null().to_numpy(zero_copy_only=False)
    return int(values.size - np.count_nonzero(np.isfinite(values)))
