"""Atomic writes (outputs built in ``<out>.partial/`` and renamed into place, sharded
Parquet writers, safetensors state), and reading with validation.

Every output is built in ``<out>.partial/`` and renamed into place when complete, so a
killed stage leaves the old artifact or a resumable partial, never a half-written
``<out>``. The partial carries a fingerprint of the inputs and params; a rerun with the
same fingerprint resumes, a different one starts afresh.
"""

from __future__ import annotations

import contextlib
import errno
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stages.artifacts.schemas import MANIFEST, is_optional, with_optional
from stages.errors import DistilError

# ---- atomic writes ---------------------------------------------------------------------

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
"""Write errors that say the destination has no room (full disk, quota, file size limit,
read-only file system): the user's to fix, not a crash to resume from."""


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
    with _reading(Path(path), "a safetensors file", "regenerate it"):  # safetensors calls a denied file "missing"
        open(path, "rb").close()
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for a bad file
        raise DistilError(f"{path} is not a readable safetensors file ({exc}); regenerate it") from None


STATE_KEY = "distil.state"
"""Header entry of a ``save_state`` file: its JSON skeleton."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Nested state (optimiser, RNG, counters) as safetensors + JSON: tensors go into the
    safetensors file under dotted keys, everything else into a JSON skeleton. No pickle.

    The skeleton is also stored in the safetensors header, and that copy is what
    ``load_state`` reads: one file replaced atomically, so a kill between the two writes
    cannot pair new tensors with an older skeleton (a resume that trains from a mix)."""
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
    save_tensors(Path(path).with_suffix(".safetensors"), tensors or {"__empty__": torch.zeros(0)},
                 metadata={STATE_KEY: json.dumps(skeleton)})  # fmt: skip
    write_json(Path(path).with_suffix(".json"), skeleton)


def load_state(path: Path) -> dict[str, Any]:
    tensors = load_tensors(Path(path).with_suffix(".safetensors"))
    with safe_open(str(Path(path).with_suffix(".safetensors")), "pt") as f:
        stored = (f.metadata() or {}).get(STATE_KEY)
    skeleton = json.loads(stored if stored is not None else Path(path).with_suffix(".json").read_text())

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
            for tmp in self.dir.rglob(".*.tmp-*"):  # a write a kill cut short; else it would ship with the output
                tmp.unlink()
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
        # bad input found mid-run is not resumable: leave nothing behind. Nor is a disk that
        # filled up (dropping the partial frees what it took). Anything else (a kill,
        # Ctrl-C, a crash) keeps the partial so a rerun resumes.
        if exc_type is not None and issubclass(exc_type, DistilError):
            self.discard()
        elif isinstance(exc, OSError) and exc.errno in NO_ROOM:
            self.discard()
            raise DistilError(f"cannot write --out {self.final}: {exc.strerror}; free space or choose another location") from None

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
    with _reading(f, "valid JSON"):
        manifest = json.loads(f.read_text())
    if not isinstance(manifest, dict):
        raise DistilError(f"{f} is not a manifest (a JSON object); regenerate the artifact")
    return manifest


# ---- reading and validation ------------------------------------------------------------


@contextlib.contextmanager
def _reading(f: Path, expected: str, hint: str = "regenerate the artifact", *, user: bool = False) -> Iterator[None]:
    """Turn what reading ``f`` can raise into one line: a file distil may not read (its
    owner's to fix), or one that is not ``expected`` (Arrow, JSON and UTF-8 errors); a
    ``user`` file "cannot be read as" CSV or Parquet (it may be either)."""
    try:
        yield
    except PermissionError:
        raise DistilError(f"permission denied: {f}; check its permissions") from None
    except FileNotFoundError:
        raise DistilError(f"{f} does not exist; check the path or run the stage that produces it") from None
    except IsADirectoryError:
        raise DistilError(f"{f} is a folder, not {expected}; {hint}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowInvalid, JSONDecodeError, UnicodeDecodeError, ...
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DistilError(
            f"cannot read {f} as {expected} ({first}); {hint}" if user else f"{f} is not {expected} ({first}); {hint}"
        ) from None


def table_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DistilError(f"{path} does not exist; check the path or run the stage that produces it")
    if path.is_dir():
        with _reading(path, "a readable folder"):
            files = sorted(path.glob("part-*.parquet")) or sorted(path.glob("*.parquet"))
        if not files:
            raise DistilError(f"{path} holds no Parquet parts; point at a table produced by distil or a .parquet file")
        return files
    return [path]


def read_any_table(path: Path) -> pa.Table:
    """A user table: a Parquet file or dataset directory, or a CSV file. Column names must
    be unique (a repeated name would make every column lookup ambiguous)."""
    files = table_files(path)
    hint = "pass a .parquet/.csv file or a distil table"
    csv = len(files) == 1 and files[0].suffix.lower() == ".csv"
    tables = []
    for f in files:
        with _reading(f, "CSV" if csv else "Parquet", hint, user=True):
            table = pacsv.read_csv(f) if csv else None
            names = table.schema.names if csv else pq.ParquetFile(f).schema_arrow.names  # decodes a CSV header (UTF-8)
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise DistilError(f"{f} repeats column name(s) {', '.join(map(repr, repeated))}; give every column its own name")
            tables.append(table if csv else pq.read_table(f))
    try:
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DistilError(f"the parts of {path} disagree on their columns ({str(exc).splitlines()[0][:160]}); {hint}") from None


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
        if schema.names.count(field.name) > 1:
            raise DistilError(f"{where} has {schema.names.count(field.name)} columns named '{field.name}'; regenerate it")
        got = schema.field(field.name).type
        if got != field.type and not _castable(got, field.type):
            raise DistilError(
                f"{where}: column '{field.name}' has type {got}, expected {field.type}; pass a table produced by the right stage"
            )


def _castable(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got) or pa.types.is_fixed_size_list(got)) and _castable(
            got.value_type, want.value_type
        )
    if pa.types.is_floating(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_string(want) or pa.types.is_large_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    return got == want


def inspect_table(path: Path, required: pa.Schema, what: str) -> tuple[list[Path], pa.Schema, int, dict[str, Any]]:
    """Validate a distil table without loading it: (part files, schema of the first part,
    rows, manifest). Every part's footer is read: each must be Parquet and hold the required
    columns with castable types, and together they must hold at least one row."""
    files = table_files(path)
    schemas, rows = [], 0
    for f in files:
        with _reading(f, "a Parquet file", f"pass {what} produced by distil"):
            meta = pq.ParquetFile(f)
            schemas.append(meta.schema_arrow)
            rows += meta.metadata.num_rows
        check_schema(schemas[-1], required, f"{what} {path}")
    if rows == 0:
        raise DistilError(f"{what} {path} is empty; check the selection or the data that produced it")
    return files, schemas[0], rows, read_manifest(path if Path(path).is_dir() else Path(path).parent)


def read_table(path: Path, required: pa.Schema, what: str) -> tuple[pa.Table, dict[str, Any]]:
    """A distil table, validated and cast to ``required`` (extra columns kept), memory-mapped.
    A required column declared not-nullable may hold no nulls, and every value must fit its
    declared type (an int64 id beyond int32, say, is refused rather than wrapped)."""
    files, schema, _, manifest = inspect_table(path, required, what)
    extra = [n for n in schema.names if n not in required.names]
    parts = []
    for f in files:
        with _reading(f, "a readable Parquet file", f"pass {what} produced by distil"):
            parts.append(pq.read_table(f, memory_map=True))
    try:
        table = with_optional(pa.concat_tables(parts, promote_options="default"), required)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DistilError(f"the parts of {what} {path} disagree ({str(exc).splitlines()[0][:160]}); regenerate it") from None
    for field in required:
        nulls = table.column(field.name).null_count
        if nulls and not field.nullable:
            raise DistilError(
                f"{what} {path}: column '{field.name}' has {nulls} empty value(s); regenerate it or drop those rows"
            )
    cast_schema = pa.schema([*required, *(table.schema.field(n) for n in extra if n in table.schema.names)])
    try:
        return table.select(cast_schema.names).cast(cast_schema), manifest
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise DistilError(f"{what} {path}: {str(exc).splitlines()[0][:160]}; regenerate it with distil") from None


def iter_batches(path: Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a table part by part, batch by batch (a part that cannot be read is one line)."""
    for f in table_files(path):
        with _reading(f, "a readable Parquet file", "regenerate the table with distil"):
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def list_column_to_numpy(column: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """A list<number> column as a 2-D float32 array; no row may be null, all rows must have
    the same length, and every value must be finite."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        raise DistilError(f"{what}: has type {column.type}, expected a list of numbers per row")
    value_type = column.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type) or pa.types.is_null(value_type)):
        raise DistilError(f"{what}: holds lists of {value_type}, expected lists of numbers")
    if column.null_count:
        raise DistilError(f"{what}: {column.null_count} row(s) are empty (null); fill or drop them")
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
