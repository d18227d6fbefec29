"""Hashes, run fingerprints, the code version and manifests: where an artifact came from."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
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
