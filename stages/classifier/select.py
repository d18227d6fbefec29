"""`distil select` for classifiers: filter and weight teacher data into a new table.

Selection never rewrites teacher data: it streams the input batch by batch and writes a
new table with the same columns plus ``weight`` and ``reason``. Only rows of
``cfg.splits`` (default: train) are filtered; dev and test rows pass through with weight
1 so evaluation stays unbiased.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from stages.artifacts import (
    CLASSIFIER_TEACHER_DATA,
    SELECTION,
    Kind,
    Output,
    TableWriter,
    artifact_hash,
    fingerprint,
    inspect_table,
    iter_batches,
    write_manifest,
)
from stages.classifier.selectors import SELECTORS
from stages.config import DataConfig, SelectConfig, to_dict
from stages.errors import DistilError
from stages.progress import progress_bar
from stages.selection import Tally


def run(cfg: SelectConfig, data, out: Path, *, student: Path | None = None, data_cfg: DataConfig | None = None,
        device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    if student is not None:
        raise DistilError(f"--student is used by --by uncertain (language models) only, not '{cfg.by}'")
    data = Path(data)
    if cfg.by not in SELECTORS:
        raise DistilError(f"unknown selection '{cfg.by}'; choose one of {', '.join(SELECTORS)}")
    if not 0 <= cfg.threshold <= 1:
        raise DistilError(f"threshold must be in [0, 1], got {cfg.threshold}")
    _, _, total, manifest = inspect_table(data, CLASSIFIER_TEACHER_DATA, "teacher data")

    params = {"select": to_dict(cfg)}
    inputs = {"data": artifact_hash(Path(data))}
    output = Output(out, fingerprint("select", params, inputs))
    with output as work:
        for stale in work.glob("part-*.parquet"):  # selection is cheap: restart rather than track batch offsets
            stale.unlink()
        writer = TableWriter(work, SELECTION)
        strategy = SELECTORS[cfg.by]
        tally = Tally(cfg.splits)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"select {cfg.by}", total=total, info="")
            for batch in iter_batches(data, CLASSIFIER_TEACHER_DATA.names, 4096):
                writer.write(tally.apply(pa.Table.from_batches([batch]), *strategy(batch, cfg)))
                bar.update(task, advance=batch.num_rows)
        if writer.done_rows == 0 or not tally.kept_any:
            raise DistilError(f"selection '{cfg.by}' kept no rows of {cfg.splits}; lower the threshold")
        write_manifest(
            work, kind=Kind.SELECTION, params=params, inputs=inputs, rows=writer.done_rows,
            model=manifest.get("model", {}), extra={"task": manifest.get("task", {}), "selection": tally.stats()},
        )  # fmt: skip
        return output.commit()
