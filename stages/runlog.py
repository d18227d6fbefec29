"""One place for what every training run does around its loop, whatever the modality:
the dvclive logger with the progress bar, restoring an unfinished run from its last
checkpoint, and the closing ``training.json`` + manifest.

A run that resumes (its partial holds a checkpoint) reopens the dvclive series where its
checkpoint stopped: the series of a resumed run counts its steps 0, 1, 2, ... like an
uninterrupted one, without a step logged twice or a step lost.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from unittest import mock

from stages.artifacts import load_state, write_json, write_manifest
from stages.progress import progress_bar

SCRATCH = ("checkpoint", "fits")
"""Subfolders of a partial that only a killed run needs; removed once the run is complete."""

FIRST_STEP = "dvclive_first_step.json"
"""Kept in a fit's checkpoint folder: the dvclive step at which the fit logged its first epoch."""

_ACTIVE: ContextVar[Series | None] = ContextVar("distil_runlog_series", default=None)


class Series:
    """The run's dvclive logger as the training loops use it (``log_metric``, ``next_step``),
    which ``restore`` can move back to the step its checkpoint reached.

    Every fit logs one step per epoch, and saves its checkpoint after logging (the
    diffusion loop only every ``checkpoint_every`` epochs), so a killed run may have logged
    epochs that its checkpoint does not hold and that the resumed run trains again. The
    rows from the rewound step on are dropped just before the next row is written (or when
    the run ends), not at the rewind: a resumed run of several fits (progressive
    distillation's rounds) restores its finished ones first, and their rewinds must not drop
    the rows of the fit that comes after them."""

    def __init__(self, live: Any):
        self.live = live
        self._stale_from: int | None = None

    @property
    def step(self) -> int:
        return self.live.step

    def log_metric(self, name: str, val: float, **kwargs: Any) -> None:
        self._drop_stale()
        self.live.log_metric(name, val, **kwargs)

    def next_step(self) -> None:
        self._drop_stale()
        self.live.next_step()

    def rewind(self, step: int) -> None:
        """Continue at ``step``: the next row logged is step ``step``, and the rows at or
        after it, from an earlier attempt, are dropped before it is written."""
        self.live.step = step
        if step:
            self.live.summary["step"] = step - 1  # what dvclive's end() and the next resume read
        else:
            self.live.summary.pop("step", None)
        self._stale_from = step

    def close(self) -> None:
        """The run ended normally: rows beyond its last rewind belong to no step it kept."""
        self._drop_stale()

    def _drop_stale(self) -> None:
        if self._stale_from is None:
            return
        for tsv in sorted(Path(self.live.plots_dir, "metrics").rglob("*.tsv")):
            _keep_rows_before(tsv, self._stale_from)
        self._stale_from = None


def _keep_rows_before(tsv: Path, step: int) -> None:
    """Rewrite a dvclive metric history (tab-separated, ``step`` column) without its rows at
    ``step`` or later; atomically, so a kill leaves the old file or the new one."""
    with open(tsv, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    # a row cut short by a kill is the newest one: it fails to parse or lies at/after ``step``
    kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[col].isdigit() and int(r[col]) < step]
    if len(kept) == len(rows):
        return
    tmp = tsv.with_name(f".{tsv.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator=os.linesep).writerows(kept)
    os.replace(tmp, tsv)


def _drop_unreadable(summary: Path) -> None:
    """dvclive rewrites its summary in place, so a kill can leave it empty; dvclive would then
    fail to resume. The step it held is not needed: ``restore`` takes it from the checkpoint."""
    try:
        json.loads(summary.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except ValueError:
        summary.unlink()


def _live(directory: Path, resume: bool) -> Any:
    """dvclive's logger for files only (no DVC experiment, no dvc.yaml of its own). dvclive asks
    git for the current commit even then, and fails in a repository with no commit yet (a fresh
    ``git init``); there it is built without looking for the repository, which it does not need."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    def build() -> Any:
        return Live(dir=str(directory), save_dvc_exp=False, dvcyaml=None, resume=resume, report=None)

    try:
        return build()
    except SCMError:
        with mock.patch("dvclive.live.get_dvc_repo", return_value=None):
            return build()


@contextlib.contextmanager
def logged(work: Path, progress: bool) -> Iterator[tuple[Series, Any]]:
    """``(live, bar)``: the run's dvclive series writing to ``<work>/dvclive`` and a rich
    progress bar. Each ``restore`` inside the block lines the series up with its checkpoint."""
    resuming = any((work / s).exists() for s in SCRATCH)
    _drop_unreadable(work / "dvclive" / "metrics.json")
    with (
        _live(work / "dvclive", resuming) as live,
        progress_bar(progress) as bar,
    ):
        if resuming:
            # dvclive resumes at the summary's "step" + 1, except after exactly one step
            # (step 0), where it starts again at 0 and logs step 0 twice
            live.step = live.summary["step"] + 1 if "step" in live.summary else 0
        series = Series(live)
        token = _ACTIVE.set(series)
        try:
            yield series, bar
            series.close()
        finally:
            _ACTIVE.reset(token)


def restore(ckpt_dir: Path, model: Any, opt: Any, sched: Any) -> dict[str, Any] | None:
    """The saved state of an unfinished run's last checkpoint (``save_state`` at
    ``<ckpt_dir>/state``) with the model, optimiser and scheduler already restored from it;
    None when the run has no checkpoint. The caller restores what else it saved.

    Inside ``logged``, a fit starts here whether it resumes or not, so this is also where the
    dvclive series is lined up: the fit's first step (recorded in ``ckpt_dir`` the first
    time) plus the epochs its checkpoint holds (``progress["epoch"]`` of the saved state)."""
    saved = None
    if (ckpt_dir / "state.json").exists():
        saved = load_state(ckpt_dir / "state")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
    series = _ACTIVE.get()
    if series is not None:
        _line_up(series, ckpt_dir, saved)
    return saved


def _line_up(series: Series, ckpt_dir: Path, saved: dict[str, Any] | None) -> None:
    mark = ckpt_dir / FIRST_STEP
    if mark.exists():
        first = int(json.loads(mark.read_text())["step"])
    else:
        first = series.step
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(mark, {"step": first})
    done = int(saved["progress"]["epoch"]) if saved is not None else 0
    series.rewind(first + done)


def finish(work: Path, summary: dict[str, Any], *, kind: str, params: dict, inputs: dict, extra: dict[str, Any]) -> None:
    """Write ``training.json`` (the whole summary), drop the resume scratch and write the
    manifest, whose ``training`` entry keeps the summary's scalar values."""
    write_json(work / "training.json", summary)
    for s in SCRATCH:
        shutil.rmtree(work / s, ignore_errors=True)
    headline = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    write_manifest(work, kind=kind, params=params, inputs=inputs, extra={**extra, "training": headline})
