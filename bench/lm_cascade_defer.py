"""Cascades on a student that must defer, and Blend-ASC against fixed-n self-consistency, over
seeds, in one process (issue 20: on a pair whose ICD-ready student alone is >= 5 points below the
teacher, ``icd-sc-cascade`` within 1 point of the teacher at <= 0.4x its cost; ``blend-asc`` at
fixed-n accuracy with >= 6x fewer samples).

The task is the default pipeline's ``chain_sum`` (params.yaml's ``data``, ``lm_teacher``,
``lm_generate``, ``lm_select``, ``lm_student``); the cascade settings are in
``bench/lm_cascade_defer.yaml``. Per seed: the teacher, its teacher data and selection, and an
ICD-ready ``kd`` student (trained with ``icd_student.demos`` retrieved demonstrations per prompt).
Then every policy on the test queries: ``icd`` (the student alone), ``teacher``,
``icd-sc-cascade`` and ``adaptive`` calibrated on dev, fixed-n self-consistency (``blend-asc``
with a budget of n: every query gets n samples, the majority answers) and ``blend-asc`` at each of
``budgets``. The accuracy-cost curve of every policy is its points over the runs (and the
calibration curve ``icd-sc-cascade`` writes); the claims state the mean over seeds and the paired
interval (``bench.harness.paired``).

    python -m bench lm_cascade_defer                      # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_cascade_defer
    BENCH_WORKDIR=/tmp/defer python -m bench lm_cascade_defer   # keep the models; a rerun redoes what changed
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.harness import cached, emit, lm_teacher_chain, paired, workdir
from stages import cascade, distill
from stages.config import CascadeConfig, DataConfig, DistillConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"
COLUMNS = ("accuracy", "cost_vs_teacher", "teacher_rate", "samples_per_query")


def _models(params: dict, bench: dict, seed: int, d: Path) -> None:
    data = load_section(DataConfig, params, "data")
    teacher, gen, sel = lm_teacher_chain(params, seed, d, TASK)
    student = replace(load_section(DistillConfig, params, "lm_student"), seed=seed, demos=bench["icd_student"]["demos"],
                      retriever=bench["cascade"]["retriever"])  # fmt: skip
    cached(d / "icd", (teacher, gen, sel, student), lambda: distill.run(student, d / "sel", d / "icd", data_cfg=data, progress=False))


def _policies(bench: dict) -> dict[str, tuple[str, dict]]:
    """label -> (policy, overrides of the cascade section)."""
    n = bench["fixed_n"]
    runs = {"icd (student alone)": ("icd", {}), "teacher": ("teacher", {"demos": 0}), "icd-sc-cascade": ("icd-sc-cascade", {}),
            f"adaptive (n<={n})": ("adaptive", {"samples": n}),
            f"fixed-n self-consistency (n={n})": ("blend-asc", {"samples": n, "sample_budget": float(n)})}  # fmt: skip
    for b in bench["budgets"]:
        runs[f"blend-asc (budget {b:g})"] = ("blend-asc", {"samples": n, "sample_budget": float(b)})
    return runs


def _curve(out: Path) -> list[dict]:
    """The dev calibration curve a threshold policy wrote (threshold, accuracy, cost)."""
    path = out / "calibration.csv"
    if not path.exists():
        return []
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(open(path))]


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    bench = yaml.safe_load((ROOT / "bench" / "lm_cascade_defer.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    base, data = load_section(CascadeConfig, bench, "cascade"), load_section(DataConfig, params, "data")
    t0 = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list] = {}
    with workdir() as tmp:
        for seed in seeds:
            d = tmp / f"s{seed}"
            _models(params, bench, seed, d)
            for i, (label, (policy, overrides)) in enumerate(_policies(bench).items()):
                cfg = replace(base, policy=policy, seed=seed, **overrides)
                out = d / f"c-{i}"
                shutil.rmtree(out, ignore_errors=True)
                cascade.run(cfg, d / "icd", d / "teacher", d / "td", out, data_cfg=data, progress=False)
                m = json.loads((out / "metrics.json").read_text())
                for col in COLUMNS:
                    rows.setdefault(label, {}).setdefault(col, []).append(float(m[col] or 0.0))
                if seed == 0 and policy in ("icd-sc-cascade", "adaptive"):
                    curves[label] = _curve(out)
                shutil.rmtree(out / "bank", ignore_errors=True)
            print(json.dumps({"seed": seed, **{k: v["accuracy"][-1] for k, v in rows.items()}}), flush=True)
    mean = {p: {c: statistics.fmean(v) for c, v in cols.items()} for p, cols in rows.items()}
    n = bench["fixed_n"]
    fixed, teacher, icd = f"fixed-n self-consistency (n={n})", "teacher", "icd (student alone)"
    acc = {p: cols["accuracy"] for p, cols in rows.items()}
    reach = [b for b in bench["budgets"] if mean[f"blend-asc (budget {b:g})"]["accuracy"] >= mean[fixed]["accuracy"]]
    summary = {
        "seeds": len(seeds), "task": TASK, "settings": bench, "per_seed": rows, "mean": mean, "dev_calibration_curves_seed0": curves,
        "icd_student_points_below_teacher": {"mean": 100 * (mean[teacher]["accuracy"] - mean[icd]["accuracy"]),
                                             **paired(acc[teacher], acc[icd])},
        "icd_sc_cascade_vs_teacher": {"within_1pt": mean["icd-sc-cascade"]["accuracy"] >= mean[teacher]["accuracy"] - 0.01,
                                      "cost_vs_teacher": mean["icd-sc-cascade"]["cost_vs_teacher"],
                                      "cost_at_most_0.4x": mean["icd-sc-cascade"]["cost_vs_teacher"] <= 0.4,
                                      **paired(acc["icd-sc-cascade"], acc[teacher])},
        "blend_asc_smallest_budget_at_fixed_n_accuracy": min(reach) if reach else None,
        "blend_asc_samples_saving": n / min(reach) if reach else None,
        "blend_asc_saving_at_least_6x": bool(reach) and n / min(reach) >= 6,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    for b in bench["budgets"]:
        summary[f"blend_asc_{b:g}_vs_fixed_n"] = paired(acc[f"blend-asc (budget {b:g})"], acc[fixed])
    lines = [f"| policy (mean over {len(seeds)} seeds) | accuracy | cost vs teacher-only | teacher rate | student samples / query |",
             "|---|---|---|---|---|"]  # fmt: skip
    for p, m in mean.items():
        sd = statistics.stdev(acc[p]) if len(acc[p]) > 1 else 0.0
        lines.append(f"| {p} | {m['accuracy']:.3f} ± {sd:.3f} | {m['cost_vs_teacher']:.2f} | {m['teacher_rate']:.0%} | "
                     f"{m['samples_per_query']:.2f} |")  # fmt: skip
    results = ROOT / "bench" / "results"
    (results / "lm_cascade_defer.md").write_text("\n".join(lines) + "\n")
    (results / "lm_cascade_defer.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_cascade_defer", **summary)
    return 0
