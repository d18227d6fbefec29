"""`distil evaluate`: metrics and plots for classifier models and cascades.

For each ``--model`` directory: accuracy, balanced accuracy, macro-F1, ECE (``bins``
equal-width bins), NLL, agreement with the teacher (when the table holds teacher
logits), parameter count and throughput, on the ``split`` rows, streamed batch by batch.
For each ``--cascade`` directory: its accuracy, teacher rate and cost from the decisions.
Writes ``metrics.json`` (one flat entry per model, for ``dvc metrics``), per-model
``plots/<name>/confusion.csv`` and ``reliability.csv`` (for ``dvc plots``), and
``summary.txt``, the table ``make demo`` prints.
Generator folders (diffusers: ``model_index.json`` + ``scheduler/``) go to
``stages.evaluate_generators`` instead: sample quality against the data, per step count.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from stages.artifacts import (
    CASCADE_DECISIONS,
    DECISIONS,
    Output,
    artifact_hash,
    fingerprint,
    list_column_to_numpy,
    read_manifest,
    read_table,
    write_json,
    write_manifest,
)
from stages.config import DataConfig, EvaluateConfig, to_dict
from stages.errors import DistilError
from stages.evaluate_lm import lm_metrics, write_routing
from stages.metrics import classification_report, expert_metrics, reliability, shot_accuracy, softmax
from stages.models import resolve_device
from stages.models.classifiers import check_compatible, identity, load_classifier, param_count
from stages.scmoe import check_decode
from stages.tasks import is_prompt_source, load_examples, prompts_in_splits, source_identity


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
    for batch in table.to_batches(max_chunksize=cfg.batch_size):
        x = torch.from_numpy(list_column_to_numpy(batch.column("features"), "features")).to(device)
        with torch.no_grad():
            z = model(x).float().cpu().numpy()
        probs.append(softmax(z))
        labels.append(batch.column("label").to_numpy())
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
    if has_teacher:
        metrics["agreement_with_teacher"] = float(np.concatenate(agree).mean())
    return metrics, p, y


def _cascade_metrics(path: Path, split: str) -> dict[str, Any]:
    table, manifest = read_table(path / DECISIONS, CASCADE_DECISIONS, "cascade decisions")
    table = table.filter(np.asarray(table.column("split").to_pylist()) == split)
    if table.num_rows == 0:
        raise DistilError(f"cascade {path} has no decisions on split '{split}'")
    m = manifest.get("metrics", {})
    correct = table.column("correct").to_numpy(zero_copy_only=False)
    teacher = np.asarray(table.column("route").to_pylist()) == "teacher"
    return {
        "accuracy": float(correct.mean()),
        "teacher_rate": float(teacher.mean()),
        "ms_per_1k_rows": float(table.column("cost_seconds").to_numpy().mean() * 1e6),
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


def summary_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="distil: models on the test split")
    for col in ("model", "accuracy", "ECE", "params", "ms / 1k rows", "teacher rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in results.items():
        table.add_row(
            name,
            f"{m['accuracy']:.4f}",
            f"{m['ece']:.4f}" if "ece" in m else "-",
            f"{m['params']:,}" if "params" in m else "-",
            f"{m['ms_per_1k_rows']:.2f}",
            f"{m['teacher_rate']:.1%}" if "teacher_rate" in m else "-",
        )
    return table


def _write_summary(work: Path, results: dict[str, dict[str, Any]], console: Console | None) -> None:
    rendered = Console(record=True, width=100, file=io.StringIO())
    rendered.print(summary_table(results))
    (work / "summary.txt").write_text(rendered.export_text())
    (console or Console()).print(summary_table(results))


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
    if not models and not cascades:
        raise DistilError("nothing to evaluate: pass at least one --model or --cascade")
    from stages.evaluate_generators import evaluate_generators, is_generator_dir

    if any(is_generator_dir(p) for p in models):  # diffusers folders: samples vs data, one row per model and step count
        if cascades or not all(is_generator_dir(p) for p in models):
            raise DistilError("evaluate generators (diffusers folders) on their own: no classifiers or cascades in the same run")
        return evaluate_generators(models, str(data), cfg.step_counts or [cfg.steps], cfg, out, data_cfg=data_cfg,
                                   device=device, console=console)  # fmt: skip
    check_decode(cfg.decode, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_weak_rank)
    if is_prompt_source(data, data_cfg):
        return _run_lm(cfg, models, data, out, data_cfg=data_cfg, device=device, console=console)
    names = [Path(p).name for p in [*models, *cascades]]
    if len(set(names)) != len(names):
        raise DistilError(f"model names must be unique (directory names {names}); rename the directories")
    if cfg.decode != "greedy" and models:
        raise DistilError(f"--decode {cfg.decode} needs a mixture-of-experts model; {models[0]} has no router (a classifier)")
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
        for path, model, config in loaded:
            metrics, probs, labels = _model_metrics(model, config, table, cfg)
            results[path.name] = metrics
            _write_plots(work / "plots" / path.name, probs, labels, cfg.bins)
        for p in cascades:
            results[Path(p).name] = _cascade_metrics(Path(p), cfg.split)
        write_json(work / "metrics.json", results)
        _write_summary(work, results, console)
        write_manifest(
            work, kind="evaluation", params=params, inputs=inputs, extra={"task": ex.meta()["task"], "metrics": results}
        )
        return output.commit()


def _run_lm(cfg: EvaluateConfig, models: list[Path], data, out: Path, *, data_cfg: DataConfig, device: str, console) -> Path:
    dev_ = resolve_device(device)
    teacher_answers = None
    if Path(data).is_dir():  # LM teacher data: its prompts, gold answers and the teacher's majority answers
        rows, task, teacher_answers = _teacher_data_prompts(Path(data), cfg.split)
    else:
        rows, task = prompts_in_splits(data, data_cfg, [cfg.split])
    if not rows:
        raise DistilError(f"{data} has no prompts in split '{cfg.split}'; set evaluate.split")
    if cfg.samples < 1 or cfg.max_new_tokens < 1:
        raise DistilError("evaluate.samples and evaluate.max_new_tokens must be positive")
    if cfg.routing_segment < 1 or cfg.routing_cache < 0:
        raise DistilError("evaluate.routing_segment must be >= 1 and routing_cache >= 0 (0 = 2 x experts per token)")
    params = {"evaluate": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": str(data), **{str(p): artifact_hash(Path(p)) for p in models}}
    output = Output(out, fingerprint("evaluate", params, inputs))
    with output as work:
        routing: dict[str, dict] = {Path(p).name: {} for p in models}  # MoE models: per-layer routing tables
        results = {
            Path(p).name: lm_metrics(Path(p), rows, task, cfg, dev_, teacher_answers, routing[Path(p).name]) for p in models
        }
        write_routing(work, routing)
        write_json(work / "metrics.json", results)
        _write_summary(work, results, console)
        write_manifest(
            work, kind="evaluation", params=params, inputs=inputs, extra={"task": {"name": str(data)}, "metrics": results}
        )
        return output.commit()


def _teacher_data_prompts(path: Path, split: str):
    from collections import Counter

    import pyarrow.parquet as pq

    from stages.tasks.reasoning import normalise, task_from_manifest

    manifest = read_manifest(path)
    table = pq.read_table(path, columns=["prompt_id", "split", "item", "prompt", "gold", "answer", "task"])
    by_prompt: dict[int, dict] = {}
    votes: dict[int, Counter] = {}
    for r in table.to_pylist():
        if r["split"] != split:
            continue
        by_prompt.setdefault(r["prompt_id"], {"id": r["prompt_id"], "split": r["split"], "item": r["item"], "prompt": r["prompt"],
                                              "answer": r["gold"], "task": r["task"]})  # fmt: skip
        if r["answer"] is not None:
            votes.setdefault(r["prompt_id"], Counter())[normalise(r["answer"])] += 1
    task = task_from_manifest(manifest)
    teacher = {p: v.most_common(1)[0][0] for p, v in votes.items()}
    return list(by_prompt.values()), task, teacher
