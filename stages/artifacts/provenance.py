"""Hashes, run fingerprints, the code version and manifests: where an artifact came from.

A manifest (``MANIFEST`` in every output directory) separates content from timing. Its
``timing`` key holds everything that varies between two runs of the same command on the
same inputs, params and seed: ``created`` (UTC time of writing) and every wall-clock
measurement the stage reported (``is_timing``: ``train_seconds``, ``rows_per_second``,
``ms_per_1k_rows``, ``seconds_per_1k``...), each at the same path it would have outside
``timing`` (``timing.training.train_seconds``, ``timing.metrics.<model>.ms_per_1k_rows``).
Everything else is a function of the inputs: two reruns into the same ``--out`` (the
command line and input paths are recorded as given) write manifests that differ only
under ``timing``, next to byte-identical tables and tensors on CPU. ``join_timing`` puts
the timing entries back where they were measured, for a reader that wants them together.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages import __version__
from stages.artifacts.schemas import MANIFEST, SCHEMA_VERSION
from stages.artifacts.store import write_json

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


# ---- manifests: content, then timing ---------------------------------------------------

TIMING = "timing"
"""The manifest key of what differs between reruns: ``created`` and wall-clock measurements."""


def is_timing(key: str) -> bool:
    """Whether a metric named ``key`` is a wall-clock measurement: a word ``seconds``
    (``train_seconds``, ``seconds_per_1k``, ``cost_vs_teacher_seconds``), a rate per
    second (``tokens_per_second``) or milliseconds (``ms_per_1k_rows``)."""
    words = str(key).lower().split("_")
    return "seconds" in words or "per_second" in str(key).lower() or words[0] == "ms"


def split_timing(obj: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(content, timing): ``obj`` without its ``is_timing`` entries (nested dicts too), and
    those entries at the same paths."""
    content: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for key, value in obj.items():
        if is_timing(key):
            timing[key] = value
        elif isinstance(value, Mapping):
            content[key], inner = split_timing(value)
            if inner:
                timing[key] = inner
        else:
            content[key] = value
    return content, timing


def join_timing(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its ``timing`` entries back at their paths (``created`` at the top)."""

    def merge(content: Mapping[str, Any], timing: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(content)
        for key, value in timing.items():
            out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        return out

    return merge({k: v for k, v in manifest.items() if k != TIMING}, manifest.get(TIMING, {}))


def _holds_tensors(directory: Path) -> bool:
    """A model directory (weights in safetensors, at its top or in component folders)."""
    return any(directory.rglob("*.safetensors"))


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
    """Write ``<directory>/MANIFEST``: what was made (kind, rows, parts, content hash), from
    what (command, resolved params, input hashes, model identity, code version), the
    stage's ``extra`` entries, and under ``timing`` when and how fast (see the module
    docstring). Returns what it wrote."""
    directory = Path(directory)
    content, timing = split_timing(extra or {})
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
        "content_hash": artifact_hash(directory) if rows is not None or _holds_tensors(directory) else None,
        **content,
        TIMING: {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **timing},
    }
    write_json(directory / MANIFEST, manifest)
    return manifest
