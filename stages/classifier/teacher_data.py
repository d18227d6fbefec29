"""`distil generate-teacher-data` for classifiers: run a trained classifier teacher over a
table and store what a student needs: the full logits (classes are few), the gold label
and the split.

Rows are processed in a fixed order and written as ``part-NNNNN.parquet`` shards of
``shard_rows`` rows; a killed run resumes after the last complete shard, so a rerun
finishes without duplicates or gaps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stages.artifacts import CLASSIFIER_TEACHER_DATA, Kind, Output, TableWriter, fingerprint, list_column_to_numpy, write_manifest
from stages.classifier.models import check_compatible, identity, load_classifier, predict_logits
from stages.config import DataConfig, GenerateTeacherDataConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.progress import progress_bar
from stages.tasks import load_examples, source_identity


def run(
    cfg: GenerateTeacherDataConfig,
    teacher: Path | list[Path],
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    if isinstance(teacher, (list, tuple)):  # several teachers are an LM feature (mst's teacher data)
        if len(teacher) != 1:
            raise DistilError(f"classifier teacher data comes from one --teacher, got {len(teacher)}; several are for LM prompts")
        teacher = teacher[0]
    if cfg.shard_rows < 1 or cfg.batch_size < 1:
        raise DistilError("shard_rows and batch_size must be positive")
    model, config = load_classifier(teacher, resolve_device(device))
    ex = load_examples(data, data_cfg)
    labels = ex.table.column("label").to_numpy()
    check_compatible(config, int(labels.max()) + 1, ex.input_shape, f"teacher {teacher}", data)
    if config.get("class_names") and ex.class_names and config["class_names"] != ex.class_names[: len(config["class_names"])]:
        raise DistilError(f"{data} names its classes {ex.class_names} but the teacher was trained on {config['class_names']}")
    table = ex.table.filter(pc.is_in(ex.table.column("split"), pa.array(cfg.splits)))
    if table.num_rows == 0:
        raise DistilError(f"{data} has no rows in splits {cfg.splits}; check generate_teacher_data.splits")
    table = table.select(["id", "split", "label", "features"])
    features = list_column_to_numpy(table.column("features"), "features")

    params = {"generate_teacher_data": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"teacher": identity(teacher)["sha256"], "data": source_identity(data)}
    output = Output(out, fingerprint("generate_teacher_data", params, inputs))
    with output as work:
        writer = TableWriter(work, CLASSIFIER_TEACHER_DATA)
        start = writer.done_rows
        t0 = time.perf_counter()
        with progress_bar(progress) as bar:
            task = bar.add_task("teacher logits", total=table.num_rows, completed=start, info="rows")
            for lo in range(start, table.num_rows, cfg.shard_rows):
                hi = min(lo + cfg.shard_rows, table.num_rows)
                logits = predict_logits(model, torch.from_numpy(features[lo:hi]), cfg.batch_size).numpy().astype(np.float32)
                if not np.isfinite(logits).all():
                    raise DistilError(f"teacher {teacher} produced NaN/inf logits; the checkpoint is broken, retrain it")
                shard = table.slice(lo, hi - lo).append_column("logits", pa.array(list(logits), type=pa.list_(pa.float32())))
                writer.write(shard)
                bar.update(task, completed=hi)
        seconds = time.perf_counter() - t0
        write_manifest(
            writer.dir,
            kind=Kind.TEACHER_DATA,
            params=params,
            inputs=inputs,
            rows=writer.done_rows,
            model={**identity(teacher), "arch": config["arch"], "num_classes": config["num_classes"]},
            extra={"task": ex.meta()["task"], "rows_per_second": (table.num_rows - start) / max(seconds, 1e-9)},
        )
        return output.commit()
