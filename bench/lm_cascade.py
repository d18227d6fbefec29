"""Every LM cascade policy on the same test items, in one process: accuracy, cost relative
to teacher-only, teacher call rate and student samples per query, per seed and averaged.

The task is ``rule_arithmetic`` (settings: ``bench/lm_cascade.yaml``): 512 made-up operators,
each with a rule only its examples show. Per seed:

- a teacher (~2.2M parameters) trained on gold answers of every family, and its teacher data
  on the train prompts of every family: the demonstration bank;
- its teacher data on a train split of families 0-255 only (``student_data``): what the
  students learn from, so half of the test queries ask them about rules they never saw;
- two students of ~89k parameters with the same step budget: a plain ``kd`` student and an
  ICD-ready ``kd`` student trained with ``icd_student.demos`` retrieved teacher
  demonstrations in each prompt (``distill demos=k``);
- every policy with the ``cascade`` section: the plain student for ``student`` and
  ``sc-cascade``; the ICD-ready student, with demonstrations, for ``icd``,
  ``icd-sc-cascade`` and ``adaptive``; both students vote in ``weighted-vote``. Adaptive
  (at most ``fixed_n`` samples) is compared with ``icd-sc-cascade`` at that fixed n.

Threshold policies calibrate on dev (target: teacher dev accuracy minus ``margin``); costs
are FLOPs (2 x parameters x tokens). Writes ``bench/results/lm_cascade.{md,json}`` and
prints the issue's claims.

    python -m bench lm_cascade                       # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_cascade
    BENCH_PARAMS=other.yaml python -m bench lm_cascade
    BENCH_WORKDIR=/tmp/cascade python -m bench lm_cascade   # keep the models; a rerun redoes what changed
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.harness import cached, emit, workdir
from stages import cascade, distill, generate_teacher_data, select
from stages.config import CascadeConfig, DataConfig, DistillConfig, GenerateTeacherDataConfig, SelectConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "rule_arithmetic"
COLUMNS = ("accuracy", "cost_vs_teacher", "teacher_rate", "samples_per_query", "kept_accuracy", "teacher_accuracy_on_kept",
           "unseen_accuracy")  # fmt: skip


def _models(params: dict, seed: int, d: Path) -> None:
    data, seen = load_section(DataConfig, params, "data"), load_section(DataConfig, params, "student_data")
    teacher = replace(load_section(DistillConfig, params, "teacher"), seed=seed)
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, TASK, d / "teacher", data_cfg=data, progress=False))
    gen = replace(load_section(GenerateTeacherDataConfig, params, "generate"), seed=seed, splits=["train", "dev"])
    for name, cfg in (("td", data), ("td-seen", seen)):
        cached(d / name, (teacher, data, gen, cfg),
               lambda cfg=cfg, name=name: generate_teacher_data.run(gen, d / "teacher", TASK, d / name, data_cfg=cfg, progress=False))  # fmt: skip
    sel = load_section(SelectConfig, params, "select")
    cached(d / "sel", (teacher, data, gen, seen, sel), lambda: select.run(sel, d / "td-seen", d / "sel", progress=False))
    student = replace(load_section(DistillConfig, params, "student"), seed=seed)
    icd = params["icd_student"]
    ready = replace(student, demos=icd["demos"], lm=replace(student.lm, context=icd["context"]))
    for name, cfg in (("plain", student), ("icd", ready)):
        cached(d / name, (teacher, data, gen, seen, sel, cfg),
               lambda cfg=cfg, name=name: distill.run(cfg, d / "sel", d / name, data_cfg=seen, progress=False))  # fmt: skip


def _policies(params: dict) -> dict[str, tuple[str, str, list[str], dict]]:
    """label -> (policy, student, voters, overrides of the cascade section)."""
    k, n = params["cascade"]["demos"], params["fixed_n"]
    return {
        "student": ("student", "plain", [], {"demos": 0}),
        "teacher": ("teacher", "plain", [], {"demos": 0}),
        "sc-cascade": ("sc-cascade", "plain", [], {"demos": 0}),
        "icd": ("icd", "icd", [], {"demos": k}),
        "icd-sc-cascade": ("icd-sc-cascade", "icd", [], {"demos": k}),
        f"icd-sc-cascade (n={n})": ("icd-sc-cascade", "icd", [], {"demos": k, "samples": n}),
        f"adaptive (icd, n<={n})": ("adaptive", "icd", [], {"demos": k, "samples": n}),
        "weighted-vote": ("weighted-vote", "plain", ["icd"], {"demos": 0}),
    }


def _unseen_accuracy(out: Path, families: int, seen: int) -> float:
    """Accuracy on the test queries whose family the students never trained on."""
    import pyarrow.parquet as pq

    from stages.tasks.mixture import build_task

    task = build_task(TASK, sizes=(1, 1, 1), seed=0, task_options={"families": families}, unlabeled=0)
    rows = pq.read_table(out / "decisions", columns=["item", "score"]).to_pylist()
    ds = task._split_dataset("test")
    unseen = [r["score"] for r in rows if ds[r["item"]]["metadata"]["family"] >= seen]
    return statistics.fmean(unseen) if unseen else float("nan")


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "bench" / "lm_cascade.yaml")).read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    base = load_section(CascadeConfig, params, "cascade")
    data = load_section(DataConfig, params, "data")
    families = params["data"]["task_options"]["families"]
    seen = params["student_data"]["task_options"]["train_options"]["family_range"][1]
    t0 = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    with workdir() as tmp:
        for seed in seeds:
            d = tmp / f"s{seed}"
            _models(params, seed, d)
            for i, (label, (policy, student, voters, overrides)) in enumerate(_policies(params).items()):
                cfg = replace(base, policy=policy, seed=seed, **overrides)
                out = d / f"c-{i}-{policy}"
                shutil.rmtree(out, ignore_errors=True)
                cascade.run(cfg, d / student, d / "teacher", d / "td", out, data_cfg=data, models=[d / v for v in voters],
                            progress=False)  # fmt: skip
                m = json.loads((out / "metrics.json").read_text())
                shutil.rmtree(out / "bank", ignore_errors=True)  # the bank is rebuilt by every run; keep the workdir small
                m["unseen_accuracy"] = _unseen_accuracy(out, families, seen)
                for col in COLUMNS:
                    rows.setdefault(label, {}).setdefault(col, []).append(float(m[col] or 0.0))
            print(json.dumps({"seed": seed, **{k: v["accuracy"][-1] for k, v in rows.items()}}), flush=True)
    mean = {p: {c: statistics.fmean(v) for c, v in cols.items()} for p, cols in rows.items()}
    std = {p: {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in cols.items()} for p, cols in rows.items()}
    lines = [f"| policy (mean ± std over {len(seeds)} seeds) | accuracy | on unseen families | cost vs teacher-only | "
             "teacher rate | student samples / query |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p, m in mean.items():
        lines.append(f"| {p} | {m['accuracy']:.3f} ± {std[p]['accuracy']:.3f} | {m['unseen_accuracy']:.3f} | "
                     f"{m['cost_vs_teacher']:.2f} | {m['teacher_rate']:.0%} | {m['samples_per_query']:.1f} |")  # fmt: skip
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "lm_cascade.md").write_text("\n".join(lines) + "\n")
    n = params["fixed_n"]
    fixed, ad = mean[f"icd-sc-cascade (n={n})"], mean[f"adaptive (icd, n<={n})"]
    icd_sc, teacher, st = mean["icd-sc-cascade"], mean["teacher"], mean["student"]
    summary = {
        "seeds": len(seeds), "per_seed": rows, "mean": mean,
        "icd_beats_student": mean["icd"]["accuracy"] > st["accuracy"],
        "icd_sc_cascade_within_1pt_of_teacher": icd_sc["accuracy"] >= teacher["accuracy"] - 0.01,
        "icd_sc_cascade_cost_at_most_a_third": icd_sc["cost_vs_teacher"] <= 1 / 3,
        "kept_at_least_teacher_on_kept": icd_sc["kept_accuracy"] >= icd_sc["teacher_accuracy_on_kept"],
        # None when adaptive drew no samples at all (its calibration deferred every query)
        "adaptive_samples_saving": fixed["samples_per_query"] / ad["samples_per_query"] if ad["samples_per_query"] > 0 else None,
        "adaptive_accuracy_gap_points": 100 * (fixed["accuracy"] - ad["accuracy"]),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    (results / "lm_cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_cascade", **summary)
    return 0
