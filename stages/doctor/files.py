"""Checks of the non-table files of an artifact: safetensors files (readable, every float
tensor finite; one tensor in memory at a time), JSON files (parse), and the manifest's
``content_hash`` against the files as they are now."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stages.artifacts import artifact_hash
from stages.doctor.findings import Finding, first_line


def check_tensors(path: Path, fix: str) -> list[Finding]:
    """A safetensors file that does not open, or its float tensors that hold NaN / inf."""
    bad: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point():
                    n = int(tensor.numel() - torch.isfinite(tensor).sum())
                    if n:
                        bad[key] = n
    except Exception as exc:  # safetensors raises several error types for a truncated or garbled file
        return [Finding(path, f"is not a readable safetensors file ({first_line(exc)})", fix)]
    return [Finding(path, f"tensor '{key}' holds {n} NaN/inf value(s)", fix) for key, n in bad.items()]


def check_json(path: Path, fix: str) -> list[Finding]:
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [Finding(path, f"is not valid JSON ({first_line(exc)})", fix)]
    return []


def check_hash(directory: Path, manifest: dict[str, Any], fix: str) -> tuple[bool | None, list[Finding]]:
    """(whether the recorded content hash matches, None when none is recorded; findings)."""
    recorded = manifest.get("content_hash")
    if not recorded:
        return None, []
    if artifact_hash(directory) == recorded:
        return True, []
    return False, [
        Finding(directory, "its files differ from the content hash in the manifest (changed after they were written)", fix)
    ]
