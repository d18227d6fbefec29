"""Classifier-free guidance on digits, and ``cfg-distill`` against it (issue 21).

Per seed: a class-conditional teacher (``bench/diffusion.yaml``'s digits teacher with
``diffusion.classes: 10`` and label dropout 0.1), then a ``cfg-distill`` student of it (the same
U-Net, one condition per guidance weight of ``WEIGHTS``). ``distil evaluate`` samples both at
``STEPS`` DDIM steps for every weight: class accuracy of the samples (the evaluation's digits
classifier says whether each is of the class asked for), Frechet distance to the train images,
per class, and diversity; plus seconds per 1k samples (CFG: two network calls per step, the
student one).

    python -m bench diffusion_cfg            # 3 seeds
    BENCH_SEEDS=1 python -m bench diffusion_cfg
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

from bench.harness import cached, emit, paired, workdir
from stages import distill
from stages.config import DataConfig, DistillConfig, EvaluateConfig, load_section
from stages.diffusion.evaluate import evaluate_generators

ROOT = Path(__file__).resolve().parents[1]
DATA, WEIGHTS, STEPS = "digits-images", [0.0, 1.0, 2.0, 4.0], 20
STUDENT_STEPS = int(os.environ.get("BENCH_STUDENT_STEPS", "1500"))
METRICS = ("class_accuracy", "fd", "fd_per_class", "diversity", "seconds_per_1k")


def main() -> int:
    spec = yaml.safe_load((ROOT / "bench" / "diffusion.yaml").read_text())[DATA]
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, spec, "data")
    t0 = time.perf_counter()
    table: dict[str, dict[str, list[float]]] = {}
    with workdir() as d:
        for seed in seeds:
            s = d / f"s{seed}"
            teacher = load_section(DistillConfig, spec, "teacher")
            teacher = replace(teacher, seed=seed, diffusion=replace(teacher.diffusion, classes=10, label_dropout=0.1))
            cached(s / "teacher", (teacher, data), lambda c=teacher, o=s / "teacher": distill.run(c, DATA, o, data_cfg=data, progress=False))
            student = replace(teacher, method="cfg-distill", steps=STUDENT_STEPS, lr=teacher.lr / 2,
                              diffusion=replace(teacher.diffusion, classes=0, guidance_weights=WEIGHTS))  # fmt: skip
            cached(s / "student", (teacher, student, data),
                   lambda c=student, o=s / "student", t=s / "teacher": distill.run(c, DATA, o, data_cfg=data, teachers=[t],
                                                                                    progress=False))  # fmt: skip
            cfg = EvaluateConfig(n_samples=1000, time_samples=256, guidance=WEIGHTS, step_counts=[STEPS], seed=seed)
            ev = evaluate_generators([s / "teacher", s / "student"], DATA, [STEPS], cfg, s / "ev", data_cfg=data,
                                     console=Console(file=io.StringIO()))  # fmt: skip
            metrics = json.loads((ev / "metrics.json").read_text())
            for key, row in metrics.items():
                if "+w" in key:
                    name = key.split("/")[0]
                    for m in METRICS:
                        table.setdefault(name, {}).setdefault(m, []).append(row.get(m))
    mean = {n: {m: statistics.fmean(v) for m, v in cols.items() if None not in v} for n, cols in table.items()}
    claims = {}
    for w in WEIGHTS:
        t, st = table[f"teacher+w{w:g}"], table[f"student+w{w:g}"]
        claims[f"w{w:g}"] = {
            "class_accuracy_student_minus_teacher": paired(st["class_accuracy"], t["class_accuracy"]),
            "fd_student_over_teacher": statistics.fmean(a / b for a, b in zip(st["fd"], t["fd"], strict=True)),
            "speedup": statistics.fmean(b / a for a, b in zip(st["seconds_per_1k"], t["seconds_per_1k"], strict=True)),
        }
    lines = [f"| model @ {STEPS} DDIM steps (mean over {len(seeds)} seeds) | w | class accuracy | FD | FD per class | diversity | s / 1k |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, v in mean.items():
        model, w = n.split("+w")
        lines.append(f"| {model} | {w} | {v['class_accuracy']:.3f} | {v['fd']:.2f} | {v.get('fd_per_class', float('nan')):.2f} | "
                     f"{v.get('diversity', float('nan')):.3f} | {v['seconds_per_1k']:.2f} |")  # fmt: skip
    results = ROOT / "bench" / "results"
    (results / "diffusion_cfg.md").write_text("\n".join(lines) + "\n")
    summary = {"seeds": len(seeds), "data": DATA, "weights": WEIGHTS, "steps": STEPS, "per_seed": table, "mean": mean,
               "claims": claims, "seconds": time.perf_counter() - t0}  # fmt: skip
    (results / "diffusion_cfg.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("diffusion_cfg", **summary)
    return 0
