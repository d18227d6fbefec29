"""Every LM cascade policy on the same test items, in one process: accuracy, cost relative
to teacher-only, teacher call rate and student samples per query, per seed and averaged.

Per seed, the LM branch of params.yaml up to its students: a teacher on gold answers, its
teacher data (with the unlabelled prompts), the label-free selection, a ``kd`` student and
an ICD-ready ``kd`` student of the same size trained with ``BENCH_DEMOS`` retrieved teacher
demonstrations in each prompt (``distill demos=k``). Then the ``lm_cascade`` section's
settings for every policy: the plain student for ``student``, ``sc-cascade`` and
``adaptive``; the ICD-ready student for ``icd`` and ``icd-sc-cascade``; both students vote
in ``weighted-vote``. Threshold policies calibrate on dev (target: teacher dev accuracy
minus ``margin``). Writes ``bench/results/lm_cascade.{md,json}``.

    python -m bench lm_cascade                       # 3 seeds
    BENCH_SEEDS=1 BENCH_DEMOS=2 python -m bench lm_cascade
    BENCH_PARAMS=small.yaml python -m bench lm_cascade   # another params file
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.harness import emit
from stages import cascade, distill, generate_teacher_data, select
from stages.config import CascadeConfig, DataConfig, DistillConfig, GenerateTeacherDataConfig, SelectConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"
COLUMNS = ("accuracy", "cost_vs_teacher", "teacher_rate", "samples_per_query", "kept_accuracy", "teacher_accuracy_on_kept")


def _models(params: dict, seed: int, d: Path, demos: int) -> None:
    data = load_section(DataConfig, params, "data")
    distill.run(
        replace(load_section(DistillConfig, params, "lm_teacher"), seed=seed), TASK, d / "teacher", data_cfg=data, progress=False
    )
    gen = replace(load_section(GenerateTeacherDataConfig, params, "lm_generate"), seed=seed)
    generate_teacher_data.run(gen, d / "teacher", TASK, d / "td", data_cfg=data, progress=False)
    select.run(load_section(SelectConfig, params, "lm_select"), d / "td", d / "sel", progress=False)
    student = replace(load_section(DistillConfig, params, "lm_student"), seed=seed, method="kd")
    distill.run(student, d / "sel", d / "kd", data_cfg=data, progress=False)
    retriever = params.get("lm_cascade", {}).get("retriever", "auto")
    icd = replace(
        student, demos=demos, retriever=retriever, lm=replace(student.lm, context=max(student.lm.context, 64 * (demos + 1)))
    )
    distill.run(icd, d / "sel", d / "icd", data_cfg=data, progress=False)


def _policies(d: Path) -> dict[str, tuple[Path, list[Path]]]:
    plain, icd = d / "kd", d / "icd"
    return {"student": (plain, []), "teacher": (plain, []), "sc-cascade": (plain, []), "adaptive": (plain, []),
            "icd": (icd, []), "icd-sc-cascade": (icd, []), "weighted-vote": (plain, [icd])}  # fmt: skip


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "params.yaml")).read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    demos = int(os.environ.get("BENCH_DEMOS", "2"))
    base = load_section(CascadeConfig, params, "lm_cascade")
    data = load_section(DataConfig, params, "data")
    t0 = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            d = Path(tmp) / f"s{seed}"
            _models(params, seed, d, demos)
            for policy, (student, voters) in _policies(d).items():
                cfg = replace(base, policy=policy, seed=seed, demos=demos if policy.startswith("icd") else 0)
                if policy == "weighted-vote":
                    cfg = replace(cfg, demos=0)
                out = cascade.run(cfg, student, d / "teacher", d / "td", d / f"c-{policy}", data_cfg=data, models=voters,
                                  progress=False)  # fmt: skip
                m = json.loads((out / "metrics.json").read_text())
                for col in COLUMNS:
                    rows.setdefault(policy, {}).setdefault(col, []).append(float(m[col] or 0.0))
    mean = {p: {c: statistics.fmean(v) for c, v in cols.items()} for p, cols in rows.items()}
    lines = [f"| policy (mean over {len(seeds)} seeds) | accuracy | cost vs teacher-only | teacher rate | student samples / query |",
             "|---|---|---|---|---|"]  # fmt: skip
    for p, m in mean.items():
        lines.append(
            f"| {p} | {m['accuracy']:.3f} | {m['cost_vs_teacher']:.2f} | {m['teacher_rate']:.0%} | {m['samples_per_query']:.1f} |"
        )
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "lm_cascade.md").write_text("\n".join(lines) + "\n")
    sc, ad, st, icd = mean["sc-cascade"], mean["adaptive"], mean["student"], mean["icd"]
    summary = {
        "seeds": len(seeds), "demos": demos, "per_seed": rows, "mean": mean,
        "icd_beats_student": icd["accuracy"] > st["accuracy"],
        "icd_sc_cascade_within_1pt_of_teacher": mean["icd-sc-cascade"]["accuracy"] >= mean["teacher"]["accuracy"] - 0.01,
        "icd_sc_cascade_cost_at_most_a_third": mean["icd-sc-cascade"]["cost_vs_teacher"] <= 1 / 3,
        # None when adaptive drew no samples at all (its calibration deferred every query)
        "adaptive_samples_saving": sc["samples_per_query"] / ad["samples_per_query"] if ad["samples_per_query"] > 0 else None,
        "adaptive_accuracy_gap_points": 100 * (sc["accuracy"] - ad["accuracy"]),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    (results / "lm_cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_cascade", **summary)
    return 0
