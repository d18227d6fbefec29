"""What ``distil doctor`` reports: a finding (where, what is wrong, how to repair it) and the
repair sentences every check shares, so each problem reads the same whatever found it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One problem of an artifact, printed as one line."""

    where: Path
    problem: str
    repair: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}; {self.repair}"


def rerun(manifest: dict[str, Any]) -> str:
    """The repair of an artifact whose files no longer match what its command wrote."""
    command = manifest.get("command")
    return f"rerun the command that wrote it: {command}" if command else "rerun the command that wrote it"


def first_line(exc: BaseException) -> str:
    """The first line of an error from a reader library, short enough for a one-line finding."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
