"""Atomic writes (outputs built in ``<out>.partial/`` and renamed into place, sharded
Parquet writers, safetensors state), and reading with validation.

Every output is built in ``<out>.partial/`` and renamed into place when complete, so a
killed stage leaves the old artifact or a resumable partial, never a half-written
``<out>``. The partial carries a fingerprint of the inputs and params; a rerun with the
same fingerprint resumes, a different one starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from stages.artifacts.schemas import MANIFEST, is_optional, with_optional
from stages.errors import DistilError

# ---- atomic writes ---------------------------------------------------------------------


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    _fsync_replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path,)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    seen: set[int] = set()
    flat = {}
    for k, v in tensors.items():  # tied weights (embeddings / LM head) share storage: store a copy
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        flat[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(flat, str(tmp), metadata=metadata)
    _fsync_replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for a bad file
        raise DistilError(f"{path} is not a readable safetensors file ({exc}); regenerate it") from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Nested state (optimiser, RNG, counters) as safetensors + JSON: tensors go into the
    safetensors file under dotted keys, everything else into a JSON skeleton. No pickle."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
        return obj

    skeleton = walk(state, "s")
    save_tensors(Path(path).with_suffix(".safetensors"), tensors or {"__empty__": torch.zeros(0)})
    write_json(Path(path).with_suffix(".json"), skeleton)


def load_state(path: Path) -> dict[str, Any]:
    tensors = load_tensors(Path(path).with_suffix(".safetensors"))
    skeleton = json.loads(Path(path).with_suffix(".json").read_text())

    def build(obj: Any) -> Any:
        if isinstance(obj, dict) and "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if isinstance(obj, dict) and "__dict__" in obj:
            return {build(k): build(v) for k, v in obj["__dict__"]}
        if isinstance(obj, dict) and "__list__" in obj:
            items = [build(v) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] else items
        return obj

    return build(skeleton)


class Output:
    """An output directory built in ``<out>.partial`` and renamed into place by ``commit``.

    Nothing is created until ``open()`` (or entering ``with output as work:``), so a
    stage validates its inputs first and bad input leaves ``--out`` untouched; a
    ``DistilError`` raised inside the ``with`` block removes the partial too.
    """

    def __init__(self, out: Path, fp: str):
        self.final = Path(out)
        self.dir = self.final.with_name(self.final.name + ".partial")
        self.fp = fp

    def open(self) -> Path:
        stamp = self.dir / ".fingerprint"
        fresh = False
        try:
            if self.dir.exists() and (not stamp.exists() or stamp.read_text().strip() != self.fp):
                shutil.rmtree(self.dir)
            fresh = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            if not stamp.exists():
                fresh = True
                stamp.write_text(self.fp + "\n")
        except OSError as exc:  # a parent that is a file, no permission, a read-only or full disk
            if fresh:
                self.discard()
            raise DistilError(f"cannot write --out {self.final}: {exc.strerror or exc}; choose a writable location") from None
        return self.dir

    @property
    def resuming(self) -> bool:
        stamp = self.dir / ".fingerprint"
        return stamp.exists() and stamp.read_text().strip() == self.fp

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        # bad input found mid-run is not resumable: leave nothing behind. Anything else
        # (a kill, Ctrl-C, a crash) keeps the partial so a rerun resumes.
        if exc_type is not None and issubclass(exc_type, DistilError):
            self.discard()

    def discard(self) -> None:
        """Drop the partial: for bad input found mid-run, where resuming makes no sense."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self) -> Path:
        (self.dir / ".fingerprint").unlink(missing_ok=True)
        old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.dir, self.final)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return self.final


class TableWriter:
    """Appends ``part-NNNNN.parquet`` files to a directory, each written atomically.

    ``done_rows`` counts rows already in complete parts, so a resumed run skips them.
    """

    def __init__(self, directory: Path, schema: pa.Schema):
        self.dir = Path(directory)
        self.schema = schema
        self.parts = sorted(self.dir.glob("part-*.parquet"))
        self.done_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts)

    def write(self, table: pa.Table | dict[str, Any]) -> None:
        if isinstance(table, dict):
            table = pa.Table.from_pydict(table, schema=self.schema)
        else:
            table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows == 0:
            return
        final = self.dir / f"part-{len(self.parts):05d}.parquet"
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp, compression="zstd")
        _fsync_replace(tmp, final)
        self.parts.append(final)
        self.done_rows += table.num_rows


def read_manifest(path: Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise DistilError(f"{f} is not valid JSON; regenerate the artifact") from None


# ---- reading and validation ------------------------------------------------------------


def table_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DistilError(f"{path} does not exist; check the path or run the stage that produces it")
    if path.is_dir():
        files = sorted(path.glob("part-*.parquet")) or sorted(path.glob("*.parquet"))
        if not files:
            raise DistilError(f"{path} holds no Parquet parts; point at a table produced by distil or a .parquet file")
        return files
    return [path]


def read_any_table(path: Path) -> pa.Table:
    """A user table: a Parquet file or dataset directory, or a CSV file."""
    files = table_files(path)
    try:
        if len(files) == 1 and files[0].suffix.lower() == ".csv":
            return pacsv.read_csv(files[0])
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0][:160]
        raise DistilError(
            f"cannot read {path} as Parquet or CSV ({first}); pass a .parquet/.csv file or a distil table"
        ) from None


def check_schema(table_or_schema: pa.Table | pa.Schema, required: pa.Schema, where: str) -> None:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    for field in required:
        if field.name not in schema.names and is_optional(field):
            continue
        if field.name not in schema.names:
            raise DistilError(
                f"{where} has no column '{field.name}' (columns: {', '.join(schema.names)}); "
                "pass a table produced by the right stage"
            )
        got = schema.field(field.name).type
        if got != field.type and not _castable(got, field.type):
            raise DistilError(f"{where}: column '{field.name}' has type {got}, expected {field.type}")


def _castable(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got) or pa.types.is_fixed_size_list(got)) and _castable(
            got.value_type, want.value_type
        )
    if pa.types.is_floating(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    return got == want


def inspect_table(path: Path, required: pa.Schema, what: str) -> tuple[list[Path], pa.Schema, int, dict[str, Any]]:
    """Validate a distil table without loading it: (part files, schema, rows, manifest).

    Checks the required columns and their types and that the table is not empty."""
    files = table_files(path)
    try:
        schema = pq.read_schema(files[0])
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (pa.ArrowInvalid, OSError):
        raise DistilError(f"{files[0]} is not a Parquet file; pass {what} produced by distil") from None
    check_schema(schema, required, f"{what} {path}")
    if rows == 0:
        raise DistilError(f"{what} {path} is empty; check the selection or the data that produced it")
    return files, schema, rows, read_manifest(path if Path(path).is_dir() else Path(path).parent)


def read_table(path: Path, required: pa.Schema, what: str) -> tuple[pa.Table, dict[str, Any]]:
    """A distil table, validated and cast to ``required`` (extra columns kept), memory-mapped."""
    files, schema, _, manifest = inspect_table(path, required, what)
    extra = [n for n in schema.names if n not in required.names]
    table = pa.concat_tables([pq.read_table(f, memory_map=True) for f in files], promote_options="default")
    table = with_optional(table, required)
    cast_schema = pa.schema([*required, *(table.schema.field(n) for n in extra)])
    return table.select(cast_schema.names).cast(cast_schema), manifest


def iter_batches(path: Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a table part by part, batch by batch."""
    for f in table_files(path):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def list_column_to_numpy(column: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """A list<float> column as a 2-D float32 array; all rows must have the same length and be finite."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = np.asarray(column.value_lengths()) if len(column) else np.zeros(0, dtype=np.int64)
    if len(lengths) and (lengths.min() != lengths.max()):
        raise DistilError(
            f"{what}: rows have different lengths ({lengths.min()}..{lengths.max()}); every row needs the same size"
        )
    width = int(lengths[0]) if len(lengths) else 0
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    array = values.reshape(len(column), width)
    if not array.flags.writeable:  # Arrow buffers are read-only; torch wants to own a writable copy
        array = array.copy()
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise DistilError(f"{what}: {bad} row(s) contain NaN or inf; clean or drop them")
    return array
