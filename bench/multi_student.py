"""``multi-student`` against one student of the same size (issue 21), on digits.

Per seed: the class-conditional teacher of ``bench/diffusion_cfg.py`` (``bench/diffusion.yaml``'s
digits teacher with ``diffusion.classes: 10``, label dropout 0.1), then, all started from it
(the same U-Net, so every student has the teacher's size) with ``bench/diffusion.yaml``'s
student settings:

- ``one student``: ``consistency-distill`` of the teacher, ``STUDENT_STEPS`` optimiser steps;
- ``one student, 2x steps``: the same with twice the steps, the training compute of the pair;
- ``multi-student``: ``diffusion.students: 2`` (classes 0-4 and 5-9), ``STUDENT_STEPS`` each.

The teacher is the one ``bench/diffusion_cfg.py`` trains (the same settings and folder: with one
``BENCH_WORKDIR`` the two benches share it). Each student answers one network call per step (the
multi-student routes each row to its class's student), so sampling costs the same. ``distil evaluate`` samples each class-conditionally
(guidance weight 0: the class asked for, no CFG) at 1 and 2 steps: class accuracy (the stage's
digits classifier), Frechet distance to the train images overall and per class, diversity.
The claims pair the seeds: multi-student minus the one student, for FD and class accuracy.

    python -m bench multi_student                                  # 3 seeds
    BENCH_SEED_LIST=1 BENCH_WORKDIR=/tmp/ms python -m bench multi_student   # one seed, kept
    BENCH_MERGE=multi_student_seed0,multi_student_seed1,multi_student_seed2 python -m bench multi_student  # one table
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

from bench.harness import cached, merged_run, paired, paired_cell, seed_list, seed_results_name, workdir, write_results
from stages import distill
from stages.config import DataConfig, DistillConfig, EvaluateConfig, load_section
from stages.diffusion.evaluate import evaluate_generators

ROOT = Path(__file__).resolve().parents[1]
DATA, STEPS = "digits-images", [1, 2]
STUDENT_STEPS = int(os.environ.get("BENCH_STUDENT_STEPS", "1000"))
METRICS = ("fd", "class_accuracy", "fd_per_class", "diversity")
MODELS = {"one student": "one", "one student, 2x steps": "one-2x", "multi-student": "multi"}


def _seed(spec: dict, data: DataConfig, seed: int, d: Path) -> dict:
    """Train (or reuse) the teacher and the three students of one seed; their metrics at guidance 0."""
    teacher = load_section(DistillConfig, spec, "teacher")
    teacher = replace(teacher, seed=seed, diffusion=replace(teacher.diffusion, classes=10, label_dropout=0.1))
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, DATA, d / "teacher", data_cfg=data, progress=False))
    base = replace(load_section(DistillConfig, spec, "student"), method="consistency-distill", seed=seed, steps=STUDENT_STEPS)
    configs = {"one": base, "one-2x": replace(base, steps=2 * STUDENT_STEPS),
               "multi": replace(base, method="multi-student", diffusion=replace(base.diffusion, students=2))}  # fmt: skip
    for name, cfg in configs.items():
        cached(d / name, (teacher, cfg, data), lambda c=cfg, o=d / name: distill.run(c, DATA, o, data_cfg=data,
                                                                                      teachers=[d / "teacher"], progress=False))  # fmt: skip
    ev = EvaluateConfig(n_samples=1000, time_samples=0, guidance=[0.0], step_counts=STEPS, seed=seed)
    cached(d / "ev-multi", (teacher, configs, data, ev),
           lambda: evaluate_generators([d / n for n in configs], DATA, STEPS, ev, d / "ev-multi", data_cfg=data,
                                       console=Console(file=io.StringIO())))  # fmt: skip
    metrics = json.loads((d / "ev-multi" / "metrics.json").read_text())
    return {f"{label}/{k}": {m: metrics[f"{name}+w0/steps_{k}"][m] for m in METRICS}
            for label, name in MODELS.items() for k in STEPS}  # fmt: skip


def report(seeds: list[int], rows: dict[str, dict[str, list]]) -> tuple[dict, list[str]]:
    """The claims (multi-student minus each one-student row, paired over the seeds) and the markdown."""
    claims = {}
    for k in STEPS:
        multi = rows[f"multi-student/{k}"]
        for name, row in ((f"{k} step", f"one student/{k}"), (f"{k} step, against 2x steps", f"one student, 2x steps/{k}")):
            claims[name] = {m: paired(multi[m], rows[row][m]) for m in ("fd", "class_accuracy")}
    lines = [f"### multi-student against one student of the same size, digits ({len(seeds)} seeds: {seeds}; "
             f"{STUDENT_STEPS} steps a student; class-conditional samples)", "",
             "| model | steps | FD | class accuracy | FD per class | diversity |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row, cols in rows.items():
        label, k = row.split("/")
        mean = {m: statistics.fmean(v) for m, v in cols.items()}
        lines.append(f"| {label} | {k} | {mean['fd']:.2f} | {mean['class_accuracy']:.3f} | {mean['fd_per_class']:.2f} | {mean['diversity']:.3f} |")
    lines += ["", "| claim: multi-student minus | FD [95% CI] (lower is better) | class accuracy [95% CI] |", "|---|---|---|"]
    for name, c in claims.items():
        cells = [paired_cell(c[m]) for m in ("fd", "class_accuracy")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return {"seeds": seeds, "data": DATA, "student_steps": STUDENT_STEPS, "per_seed": rows, "claims": claims}, lines


def main() -> int:
    if merged_run("multi_student", report):  # BENCH_MERGE=multi_student_seed0,multi_student_seed1,...: one table of those runs
        return 0
    spec = yaml.safe_load((ROOT / "bench" / "diffusion.yaml").read_text())[DATA]
    data = load_section(DataConfig, spec, "data")
    seeds, t0 = seed_list(), time.perf_counter()
    with workdir() as root:
        per_seed = [_seed(spec, data, seed, root / f"s{seed}") for seed in seeds]
    out, lines = report(seeds, {row: {m: [s[row][m] for s in per_seed] for m in METRICS} for row in per_seed[0]})
    write_results(seed_results_name("multi_student", seeds), {**out, "seconds": time.perf_counter() - t0}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
