"""Classifier-free guidance on digits, and ``cfg-distill`` against it (issue 21).

Per seed: a class-conditional teacher (``bench/diffusion.yaml``'s digits teacher with
``diffusion.classes: 10`` and label dropout 0.1), then a ``cfg-distill`` student of it (the same
U-Net, one condition per guidance weight of ``WEIGHTS``). ``distil evaluate`` samples both at
``STEPS`` DDIM steps for every weight: class accuracy of the samples (the evaluation's digits
classifier says whether each is of the class asked for), Frechet distance to the train images,
per class, and diversity; plus seconds per 1k samples (CFG: two network calls per step, the
student one).

A second student, ``student-div``, adds the diversity term (``diffusion.diversity`` =
``DIVERSITY``); the claims pair the seeds (its diversity, FD and class accuracy minus the plain
student's, and the student's class accuracy minus CFG's).

    python -m bench diffusion_cfg            # 3 seeds
    BENCH_SEED_LIST=1 BENCH_WORKDIR=/tmp/cfg python -m bench diffusion_cfg   # one seed, kept for a later 3-seed run
    BENCH_MERGE=diffusion_cfg_seed0,diffusion_cfg_seed1,diffusion_cfg_seed2 python -m bench diffusion_cfg   # one table
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
DATA, WEIGHTS, STEPS = "digits-images", [0.0, 1.0, 2.0, 4.0], 20
STUDENT_STEPS = int(os.environ.get("BENCH_STUDENT_STEPS", "1500"))
DIVERSITY = float(os.environ.get("BENCH_DIVERSITY", "0.02"))  # the diversity-tuned student's diffusion.diversity
METRICS = ("class_accuracy", "fd", "fd_per_class", "diversity", "seconds_per_1k")


def _seed(spec: dict, data: DataConfig, seed: int, s: Path) -> dict:
    """Train (or reuse) one seed's teacher and students and evaluate them (cached too): metrics.json's rows."""
    teacher = load_section(DistillConfig, spec, "teacher")
    teacher = replace(teacher, seed=seed, diffusion=replace(teacher.diffusion, classes=10, label_dropout=0.1))
    cached(s / "teacher", (teacher, data), lambda: distill.run(teacher, DATA, s / "teacher", data_cfg=data, progress=False))
    student = replace(teacher, method="cfg-distill", steps=STUDENT_STEPS, lr=teacher.lr / 2,
                      diffusion=replace(teacher.diffusion, classes=0, guidance_weights=WEIGHTS))  # fmt: skip
    students = {"student": student, "student-div": replace(student, diffusion=replace(student.diffusion, diversity=DIVERSITY))}
    for name, c in students.items():
        cached(s / name, (teacher, c, data), lambda c=c, o=s / name: distill.run(c, DATA, o, data_cfg=data, teachers=[s / "teacher"],
                                                                                  progress=False))  # fmt: skip
    cfg = EvaluateConfig(n_samples=1000, time_samples=256, guidance=WEIGHTS, step_counts=[STEPS], seed=seed)
    models = [s / "teacher", *(s / n for n in students)]
    cached(s / "ev", (teacher, students, data, cfg),
           lambda: evaluate_generators(models, DATA, [STEPS], cfg, s / "ev", data_cfg=data, console=Console(file=io.StringIO())))  # fmt: skip
    return json.loads((s / "ev" / "metrics.json").read_text())


def report(seeds: list[int], table: dict[str, dict[str, list]]) -> tuple[dict, list[str]]:
    """The per-weight claims (paired over the seeds) and the markdown of one or more seeds' rows."""
    mean = {n: {m: statistics.fmean(v) for m, v in cols.items() if None not in v} for n, cols in table.items()}
    claims = {}
    for w in WEIGHTS:
        t, st, div = (table[f"{n}+w{w:g}"] for n in ("teacher", "student", "student-div"))
        claims[f"w{w:g}"] = {
            "class_accuracy_student_minus_teacher": paired(st["class_accuracy"], t["class_accuracy"]),
            "fd_student_over_teacher": statistics.fmean(a / b for a, b in zip(st["fd"], t["fd"], strict=True)),
            "speedup": statistics.fmean(b / a for a, b in zip(st["seconds_per_1k"], t["seconds_per_1k"], strict=True)),
            "diversity_term": {m: paired(div[m], st[m]) for m in ("diversity", "fd", "class_accuracy")},
        }
    lines = [f"| model @ {STEPS} DDIM steps (mean over {len(seeds)} seeds: {seeds}) | w | class accuracy | FD | FD per class | "
             "diversity | s / 1k |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, v in sorted(mean.items()):
        model, w = n.split("+w")
        lines.append(f"| {model} | {w} | {v['class_accuracy']:.3f} | {v['fd']:.2f} | {v.get('fd_per_class', float('nan')):.2f} | "
                     f"{v.get('diversity', float('nan')):.3f} | {v['seconds_per_1k']:.2f} |")  # fmt: skip
    lines += ["", f"| w | student - teacher: class accuracy [95% CI] | student-div ({DIVERSITY:g}) - student: diversity | FD | "
              "class accuracy |", "|---|---|---|---|---|"]  # fmt: skip
    for w, c in claims.items():
        cells = [c["class_accuracy_student_minus_teacher"], *(c["diversity_term"][m] for m in ("diversity", "fd", "class_accuracy"))]
        lines.append(f"| {w[1:]} | " + " | ".join(paired_cell(x) for x in cells) + " |")
    return {"seeds": seeds, "data": DATA, "weights": WEIGHTS, "steps": STEPS, "diversity": DIVERSITY, "per_seed": table,
            "mean": mean, "claims": claims}, lines  # fmt: skip


def main() -> int:
    if merged_run("diffusion_cfg", report):  # BENCH_MERGE=diffusion_cfg_seed0,diffusion_cfg_seed1,...: one table of those runs
        return 0
    spec = yaml.safe_load((ROOT / "bench" / "diffusion.yaml").read_text())[DATA]
    seeds, data, t0 = seed_list(), load_section(DataConfig, spec, "data"), time.perf_counter()
    table: dict[str, dict[str, list[float]]] = {}
    with workdir() as d:
        for seed in seeds:
            for key, row in _seed(spec, data, seed, d / f"s{seed}").items():
                if "+w" in key:
                    for m in METRICS:
                        table.setdefault(key.split("/")[0], {}).setdefault(m, []).append(row.get(m))
    out, lines = report(seeds, table)
    write_results(seed_results_name("diffusion_cfg", seeds), {**out, "seconds": time.perf_counter() - t0}, lines)
    return 0
