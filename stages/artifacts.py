"""The contract between stages: Parquet schemas, atomic sharded writers, manifests,
safetensors helpers and validation on read.

A table is a directory of ``part-NNNNN.parquet`` files plus ``_manifest.json``; any
Parquet reader (``pyarrow.parquet.read_table(dir)``, DuckDB, polars,
``datasets.load_dataset("parquet")``) reads it without distil. The manifest's leading
underscore is what lets directory readers skip it, as they skip Spark's ``_SUCCESS``.

Every output is built in ``<out>.partial/`` and renamed into place when complete, so a
killed stage leaves the old artifact or a resumable partial, never a half-written
``<out>``. The partial carries a fingerprint of the inputs and params; a rerun with the
same fingerprint resumes, a different one starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from stages import __version__
from stages.errors import DistilError

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"  # leading "_": pyarrow / Spark-style readers skip it when reading the directory

# ---- schemas as code -------------------------------------------------------------------

OPTIONAL = b"distil.optional"
"""Field metadata key of a column added to a schema after files were written without it."""


def optional_field(name: str, type_: pa.DataType, why: str) -> pa.Field:
    """A nullable column that older files may lack: validation lets it be missing and
    ``with_optional`` reads it as nulls, so tables written before it existed stay valid."""
    return pa.field(name, type_, nullable=True, metadata={OPTIONAL: why.encode()})


def is_optional(field: pa.Field) -> bool:
    return field.metadata is not None and OPTIONAL in field.metadata


def with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with a null column for every optional field of ``schema`` it lacks."""
    for f in schema:
        if is_optional(f) and f.name not in table.schema.names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


EXAMPLES = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Canonical classifier examples: one row per instance, features flattened."""

CLASSIFIER_TEACHER_DATA = EXAMPLES.append(pa.field("logits", pa.list_(pa.float32()), nullable=False))
"""Examples plus the teacher's full logits (classes are few, so no top-k)."""

SELECTION = CLASSIFIER_TEACHER_DATA.append(pa.field("weight", pa.float32(), nullable=False)).append(
    pa.field("reason", pa.string(), nullable=False)
)
"""Teacher data that survived a selection, with a training weight and why it was kept."""

CASCADE_DECISIONS = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("route", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("answer", pa.int64()),
        pa.field("correct", pa.bool_()),
        pa.field("cost_seconds", pa.float64()),
        pa.field("cost_flops", pa.float64()),
    ]
)
"""One row per query routed by a cascade."""

LM_TEACHER_DATA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.int64(), nullable=False),
        pa.field("sample", pa.int32(), nullable=False),
        optional_field("teacher", pa.int32(), "index into the manifest's teachers; null (files before it) = 0"),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("item", pa.int64()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("gold", pa.string()),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("parse", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("seq_logprob", pa.float32(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float16()), nullable=False),
        optional_field("expert_ids", pa.list_(pa.uint8()), "MoE teachers: routed experts per generated token; empty/null = none"),
        optional_field("expert_weights", pa.list_(pa.float16()), "MoE teachers: router weights of expert_ids"),
    ]
)
"""LM teacher samples: per generated token the top-k teacher token ids and log-probs,
flattened row-major (``len(token_ids) * k`` values; k is in the manifest), never full
vocabularies. ``answer`` is null when none could be parsed, with ``parse`` saying why.
MoE teachers also store their routing per generated token (``stages.routing``: the input
position that predicted the token): ``expert_ids`` / ``expert_weights`` flattened token,
then layer, then rank (``len(token_ids) * layers * experts_per_token`` values, shape in the
manifest's ``routing``); empty for dense teachers, null in files written before them."""

LM_SELECTION = LM_TEACHER_DATA.append(pa.field("weight", pa.float32(), nullable=False)).append(
    pa.field("reason", pa.string(), nullable=False)
)
"""LM teacher samples kept by a selection, with a training weight and why."""

LM_CASCADE_DECISIONS = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("item", pa.int64()),
        pa.field("gold", pa.string()),
        pa.field("route", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("agreement", pa.float32()),
        pa.field("samples_used", pa.int32()),
        pa.field("demos_used", pa.list_(pa.int64())),
        pa.field("student_prompt_tokens", pa.int64()),
        pa.field("student_completion_tokens", pa.int64()),
        pa.field("teacher_prompt_tokens", pa.int64()),
        pa.field("teacher_completion_tokens", pa.int64()),
        pa.field("voter_prompt_tokens", pa.int64()),
        pa.field("voter_completion_tokens", pa.int64()),
        pa.field("cost", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("student_answer", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("correct", pa.bool_()),
    ]
)
"""One row per test query routed by a language-model cascade: the student's sampled
answers (null where unparsable), its majority share (``agreement``), the bank ids of the
demonstrations in its prompt, tokens per model (``voter_*``: the extra weighted-vote
models), cost in the run's unit, and the final answer with its score (null without gold)."""

ICD_BANK = pa.schema(
    [
        pa.field("bank_id", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)
"""The demonstration bank of an LM cascade: ``text`` is what goes into a student prompt;
``source`` is ``teacher_data`` or ``online`` (a deferred query the teacher answered)."""

DIFFUSION_TEACHER_DATA = pa.schema(
    [
        pa.field("sample", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("timestep", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
    ]
)
"""Index of a generator's trajectories: one row per stored state. The states themselves
are in ``_states/shard-NNNNN.safetensors`` (tensor ``states`` [rows, *sample_shape],
float32), row ``offset`` of shard ``shard``; part ``part-NNNNN.parquet`` indexes shard
NNNNN (Parquet directory readers skip ``_``-prefixed entries, as the manifest). ``seed``
seeded the sample's noise; ``step`` 0 is that noise, ``timestep`` the teacher timestep of
the state (-1: the final sample, step = the number of steps)."""

DECISIONS = "decisions"
"""A cascade's output keeps its decisions table in this subdirectory, beside its JSON and
CSV files, so plain Parquet readers open ``<cascade>/decisions`` directly."""

# ---- hashing and provenance ------------------------------------------------------------


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_hash(path: Path) -> str:
    """Content hash of a file, a table (its parts) or a model directory (its tensors + config)."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for f in sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in {".parquet", ".safetensors", ".csv"} or p.name == "config.json"
    ):
        if ".partial" in f.parts or "checkpoint" in f.parts:
            continue
        h.update(str(f.relative_to(path)).encode())
        h.update(file_hash(f).encode())
    return h.hexdigest()


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"distil {__version__}" + (f" ({sha})" if sha else "")


def fingerprint(stage: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Identity of a run: a partial is resumed only by a run with the same fingerprint."""
    blob = json.dumps({"stage": stage, "params": params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
        if self.dir.exists() and (not stamp.exists() or stamp.read_text().strip() != self.fp):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            stamp.write_text(self.fp + "\n")
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


def write_manifest(
    directory: Path,
    *,
    kind: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    rows: int | None = None,
    model: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    directory = Path(directory)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "rows": rows,
        "parts": sorted(p.name for p in directory.glob("part-*.parquet")),
        "command": " ".join(["distil", *sys.argv[1:]]) if Path(sys.argv[0]).name == "distil" else " ".join(sys.argv),
        "params": params,
        "inputs": inputs,
        "model": model or {},
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "content_hash": artifact_hash(directory) if rows is not None else None,
        **(extra or {}),
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


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
