"""`distil evaluate` for classifiers: metrics and plots for classifier models and cascades.

For each ``--model`` directory: accuracy, balanced accuracy, macro-F1, ECE (``bins``
equal-width bins), NLL, agreement with the teacher (when the table holds teacher
logits), parameter count and throughput, on the ``split`` rows, streamed batch by batch.
For each ``--cascade`` directory: its accuracy, teacher rate and cost from the decisions.
Writes ``metrics.json`` (one flat entry per model, for ``dvc metrics``), per-model
``plots/<name>/confusion.csv`` and ``reliability.csv`` (for ``dvc plots``), and
``summary.txt``, the table ``make demo`` prints. With two models or more, ``paired.json``: for
every pair of models, the paired bootstrap interval of the accuracy difference on the same rows
and McNemar's test (``stages.metrics.all_pairs``), also printed under the table (cascades stay out of it).
Generator folders (diffusers: ``model_index.json`` + ``scheduler/``) go to
``stages.diffusion.evaluate`` instead: sample quality against the data, per step count.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from stages.artifacts import (
    CASCADE_DECISIONS,
    DECISIONS,
    Kind,
    Output,
    artifact_hash,
    fingerprint,
    join_timing,
    list_column_to_numpy,
    read_table,
    write_json,
    write_manifest,
)
from stages.classifier.models import check_compatible, identity, load_classifier, param_count
from stages.classifier.multitask import TaskReport
from stages.config import DataConfig, EvaluateConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.metrics import classification_report, expert_metrics, reliability, shot_accuracy, softmax
from stages.report import write_paired, write_summary
from stages.tasks import load_examples, source_identity


def _time_per_row(model, table, batch_size: int, device, repeats: int = 5) -> float:
    """Median wall time per row of one batch (a warm-up pass first): steadier than timing
    the metrics pass, where a single sub-millisecond batch is mostly noise."""
    x = torch.from_numpy(list_column_to_numpy(table.slice(0, batch_size).column("features"), "features")).to(device)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(x)


def _model_metrics(model, config: dict, table, cfg: EvaluateConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    probs, labels, agree, expert_preds = [], [], [], []
    has_teacher = "logits" in table.schema.names
    experts = config.get("experts", 1)
    seconds_per_row = _time_per_row(model, table, cfg.batch_size, device)
    tasks = TaskReport(model) if config.get("multitask") else None
    for batch in table.to_batches(max_chunksize=cfg.batch_size):
        x = torch.from_numpy(list_column_to_numpy(batch.column("features"), "features")).to(device)
        with torch.no_grad():
            z = model(x).float().cpu().numpy()
        probs.append(softmax(z))
        labels.append(batch.column("label").to_numpy())
        if tasks is not None:
            tasks.add(x, torch.from_numpy(labels[-1].astype(np.int64)))
        if experts > 1:
            with torch.no_grad():
                expert_preds.append(model.expert_logits(x).argmax(-1).cpu().numpy())
        if has_teacher:
            t = list_column_to_numpy(batch.column("logits"), "teacher logits")
            agree.append(t.argmax(1) == z.argmax(1))
    p, y = np.concatenate(probs), np.concatenate(labels)
    rows = len(y)
    metrics = classification_report(p, y, config["num_classes"], cfg.bins)
    metrics.update(
        params=param_count(model),
        rows=rows,
        rows_per_second=1 / max(seconds_per_row, 1e-12),
        ms_per_1k_rows=1000 * 1000 * seconds_per_row,
    )
    if config.get("class_counts"):
        metrics.update(shot_accuracy(p.argmax(1), y, np.asarray(config["class_counts"]), cfg.many_shot, cfg.few_shot))
    if expert_preds:
        metrics.update(expert_metrics(np.concatenate(expert_preds), y))
    if tasks is not None:
        metrics.update(tasks.metrics())
    if has_teacher:
        metrics["agreement_with_teacher"] = float(np.concatenate(agree).mean())
    return metrics, p, y


def _cascade_metrics(path: Path, split: str) -> dict[str, Any]:
    table, manifest = read_table(path / DECISIONS, CASCADE_DECISIONS, "cascade decisions")
    table = table.filter(np.asarray(table.column("split").to_pylist()) == split)
    if table.num_rows == 0:
        raise DistilError(f"cascade {path} has no decisions on split '{split}'")
    m = join_timing(manifest).get("metrics", {})  # seconds_per_1k_rows is under timing
    if "seconds_per_1k_rows" not in m:
        raise DistilError(f"cascade {path}: its decisions manifest has no metrics; rerun `distil cascade`")
    correct = table.column("correct").to_numpy(zero_copy_only=False)
    teacher = np.asarray(table.column("route").to_pylist()) == "teacher"
    return {
        "accuracy": float(correct.mean()),
        "teacher_rate": float(teacher.mean()),
        "ms_per_1k_rows": 1000 * float(m["seconds_per_1k_rows"]),
        "flops_per_row": float(table.column("cost_flops").to_numpy().mean()),
        "cost_vs_teacher_flops": m.get("cost_vs_teacher_flops"),
        "rows": table.num_rows,
    }


def _write_plots(directory: Path, probs: np.ndarray, labels: np.ndarray, bins: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "confusion.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["actual", "predicted"])
        w.writerows(zip(labels.tolist(), probs.argmax(1).tolist(), strict=True))
    with open(directory / "reliability.csv", "w", newline="") as fh:
        rows = [r for r in reliability(probs, labels, bins) if r["count"]]
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run(
    cfg: EvaluateConfig,
    models: list[Path],
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    cascades: list[Path] = (),
    device: str = "auto",
    console: Console | None = None,
) -> Path:
    names = [Path(p).name for p in [*models, *cascades]]
    if len(set(names)) != len(names):
        raise DistilError(f"model names must be unique (directory names {names}); rename the directories")
    dev_ = resolve_device(device)
    loaded = [(Path(p), *load_classifier(p, dev_)) for p in models]
    for p in cascades:
        read_table(Path(p) / DECISIONS, CASCADE_DECISIONS, "cascade decisions")
    ex = load_examples(data, data_cfg)
    table = ex.split(cfg.split)
    if table.num_rows == 0:
        raise DistilError(f"{data} has no rows in split '{cfg.split}'; set evaluate.split to train, dev or test")
    for path, _, config in loaded:
        check_compatible(config, ex.num_classes, ex.input_shape, f"model {path}", data)

    params = {"evaluate": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data), **{str(p): identity(p)["sha256"] for p, _, _ in loaded},
              **{str(p): artifact_hash(Path(p)) for p in cascades}}  # fmt: skip
    output = Output(out, fingerprint("evaluate", params, inputs))
    with output as work:
        results: dict[str, dict[str, Any]] = {}
        correct: dict[str, np.ndarray] = {}
        for path, model, config in loaded:
            metrics, probs, labels = _model_metrics(model, config, table, cfg)
            results[path.name] = metrics
            correct[path.name] = (probs.argmax(1) == labels).astype(np.float64)
            _write_plots(work / "plots" / path.name, probs, labels, cfg.bins)
        for p in cascades:
            results[Path(p).name] = _cascade_metrics(Path(p), cfg.split)
        write_json(work / "metrics.json", results)
        write_summary(work, results, console)
        write_paired(work, correct, console)
        write_manifest(
            work, kind=Kind.EVALUATION, params=params, inputs=inputs, extra={"task": ex.meta()["task"], "metrics": results}
        )
        return output.commit()
