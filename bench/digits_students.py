"""KD student vs the CE-only student of the same size on digits, over seeds, with the
cascade, all in one process: the figures the foundation issue asks for.

One teacher (the ``teacher`` section of params.yaml), its teacher data and selection;
then for each seed a ``kd`` student and a ``ce`` student with the ``distill`` section's
architecture, and a confidence cascade on the KD student. Prints one JSON object with
per-seed test accuracies, means, standard deviations, the KD/CE accuracy ratio and the
cascade's teacher rate and accuracy gap to the teacher.

    python -m bench digits_students          # 3 seeds
    BENCH_SEEDS=5 python -m bench digits_students
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

from bench.harness import emit
from stages import cascade, distill, evaluate, generate_teacher_data, select
from stages.config import (
    CascadeConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateTeacherDataConfig,
    SelectConfig,
    load_section,
)

ROOT = Path(__file__).resolve().parents[1]


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    data_cfg = load_section(DataConfig, params, "data")
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    quiet = Console(file=io.StringIO())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        distill.run(load_section(DistillConfig, params, "teacher"), "digits", d / "teacher", data_cfg=data_cfg, progress=False)
        generate_teacher_data.run(
            GenerateTeacherDataConfig(), d / "teacher", "digits", d / "td", data_cfg=data_cfg, progress=False
        )
        select.run(load_section(SelectConfig, params, "select"), d / "td", d / "sel", progress=False)
        student = load_section(DistillConfig, params, "distill")
        acc: dict[str, list[float]] = {"kd": [], "ce": [], "cascade": [], "teacher_rate": []}
        teacher_acc = None
        for seed in seeds:
            for method in ("kd", "ce"):
                distill.run(
                    replace(student, method=method, seed=seed),
                    d / "sel",
                    d / f"{method}{seed}",
                    data_cfg=data_cfg,
                    progress=False,
                )
            cascade.run(load_section(CascadeConfig, params, "cascade"), d / f"kd{seed}", d / "teacher", d / "td", d / f"c{seed}",
                        data_cfg=data_cfg, progress=False)  # fmt: skip
            ev = evaluate.run(EvaluateConfig(), [d / "teacher", d / f"kd{seed}", d / f"ce{seed}"], d / "td", d / f"ev{seed}",
                              data_cfg=data_cfg, cascades=[d / f"c{seed}"], console=quiet)  # fmt: skip
            m = json.loads((ev / "metrics.json").read_text())
            teacher_acc = m["teacher"]["accuracy"]
            acc["kd"].append(m[f"kd{seed}"]["accuracy"])
            acc["ce"].append(m[f"ce{seed}"]["accuracy"])
            acc["cascade"].append(m[f"c{seed}"]["accuracy"])
            acc["teacher_rate"].append(m[f"c{seed}"]["teacher_rate"])
    kd, ce = _mean_std(acc["kd"]), _mean_std(acc["ce"])
    emit(
        "digits_students",
        seeds=len(seeds),
        student=student.model.__dict__,
        teacher_test_accuracy=teacher_acc,
        kd_test_accuracy=kd | {"per_seed": acc["kd"]},
        ce_test_accuracy=ce | {"per_seed": acc["ce"]},
        kd_over_ce_accuracy_ratio=kd["mean"] / ce["mean"],
        kd_beats_ce=kd["mean"] > ce["mean"],
        cascade_test_accuracy=_mean_std(acc["cascade"]),
        cascade_gap_to_teacher_points=100 * (teacher_acc - statistics.fmean(acc["cascade"])),
        cascade_teacher_rate=_mean_std(acc["teacher_rate"]),
        seconds=time.perf_counter() - t0,
    )
    return 0
