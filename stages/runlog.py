"""One place for what every training run does around its loop, whatever the modality:
the dvclive logger with the progress bar, restoring an unfinished run from its last
checkpoint, and the closing ``training.json`` + manifest.

A run that resumes (its partial holds a checkpoint) reopens the dvclive series where it
stopped instead of starting a new one.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.artifacts import load_state, write_json, write_manifest
from stages.progress import progress_bar

SCRATCH = ("checkpoint", "fits")
"""Subfolders of a partial that only a killed run needs; removed once the run is complete."""


@contextlib.contextmanager
def logged(work: Path, progress: bool) -> Iterator[tuple[Any, Any]]:
    """``(live, bar)``: a dvclive logger writing to ``<work>/dvclive`` and a rich progress bar."""
    from dvclive import Live

    resuming = any((work / s).exists() for s in SCRATCH)
    with (
        Live(dir=str(work / "dvclive"), save_dvc_exp=False, dvcyaml=None, resume=resuming, report=None) as live,
        progress_bar(progress) as bar,
    ):
        yield live, bar


def restore(ckpt_dir: Path, model: Any, opt: Any, sched: Any) -> dict[str, Any] | None:
    """The saved state of an unfinished run's last checkpoint (``save_state`` at
    ``<ckpt_dir>/state``) with the model, optimiser and scheduler already restored from it;
    None when the run has no checkpoint. The caller restores what else it saved."""
    if not (ckpt_dir / "state.json").exists():
        return None
    saved = load_state(ckpt_dir / "state")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return saved


def finish(work: Path, summary: dict[str, Any], *, kind: str, params: dict, inputs: dict, extra: dict[str, Any]) -> None:
    """Write ``training.json`` (the whole summary), drop the resume scratch and write the
    manifest, whose ``training`` entry keeps the summary's scalar values."""
    write_json(work / "training.json", summary)
    for s in SCRATCH:
        shutil.rmtree(work / s, ignore_errors=True)
    headline = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    write_manifest(work, kind=kind, params=params, inputs=inputs, extra={**extra, "training": headline})
