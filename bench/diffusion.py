"""Diffusion students at one budget, in one process: every generator method against its
teacher on 2-D moons and on 8x8 digits, with the settings of ``bench/diffusion.yaml``.

Per seed and dataset: a diffusion teacher trained with ``denoise``; its ODE trajectories
(``generate-teacher-data``) for the image-free ``trajectory`` method; then each student
method with the same optimiser steps (``progressive``: the same total over its rounds). ``evaluate`` samples every model from the same
seeded noise: the teacher at 1, 4 and 50 ODE steps, the students at 1, 2 and 4 steps;
quality is the sliced Wasserstein distance to the test split (2-D) or the Frechet distance
in a digits classifier's feature space (digits), next to the held-out-data floor. The floor has
fewer rows (the test split) than the models' samples, and both distances shrink with n, so the
table also gives each model's distance on its first floor-n samples (``fd at the floor's n``), the
fair comparison with the floor; on digits also fidelity and diversity apart (precision, recall,
density, coverage in the same feature space: ``stages.diffusion.metrics.manifold``).

Writes ``bench/results/diffusion.{md,json}`` and prints one JSON line with the claims:
the 1-step ``consistency-distill`` student within 1.5x of the 50-step teacher and below
half of the 1-step teacher, its sampling speed-up over the 50-step teacher, and whether
its paired error to the teacher's ODE fell during training.

    python -m bench diffusion                                  # 3 seeds, both datasets
    BENCH_SEEDS=1 BENCH_DATASETS=moons BENCH_METHODS=consistency-distill python -m bench diffusion
    BENCH_SEEDS=1 BENCH_DATASETS=digits-images BENCH_RESULTS=diffusion_second_wave python -m bench diffusion
    BENCH_SEED_LIST=1 BENCH_DATASETS=digits-images BENCH_RESULTS=diffusion_second_wave_seed1 python -m bench diffusion
    BENCH_MERGE=diffusion_second_wave,diffusion_second_wave_seed1,diffusion_second_wave_seed2 \
        BENCH_RESULTS=diffusion_second_wave_3seeds python -m bench diffusion     # one table of the three runs
    BENCH_SEED_LIST=0 BENCH_DATASETS=digits-images BENCH_METHODS=phased-dmd BENCH_RESULTS=diffusion_phased_dmd_seed0 \
        python -m bench diffusion                    # one method again, on the same seed's (cached or rebuilt) teacher
    BENCH_MERGE=... BENCH_REPLACE=diffusion_phased_dmd_seed0,... python -m bench diffusion   # its rows replace the old ones

Each dataset's ``methods`` and per-method ``overrides`` come from the settings file (the
U-Net students on digits cost minutes each on CPU, so digits runs ``consistency-distill``).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

from bench.harness import cached, emit, paired, paired_cell, seed_list, workdir
from stages import distill, evaluate, generate_teacher_data
from stages.config import DataConfig, DistillConfig, EvaluateConfig, GenerateTeacherDataConfig, load_section
from stages.diffusion.methods import DIFFUSION_METHODS

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("consistency-distill", "multistep", "consistency-train", "trajectory", "progressive", "dual-expert", "scott", "dmd",
           "phased-dmd", "flow-map")
TEACHER_STEPS, STUDENT_STEPS = [1, 4, 50], [1, 2, 4]


def _env_list(name: str, default: tuple[str, ...]) -> list[str]:
    return [x for x in os.environ.get(name, ",".join(default)).split(",") if x]


def _quality(dataset: str) -> str:
    return "sw" if dataset != "digits-images" else "fd"


def _student(settings: dict, method: str, seed: int) -> DistillConfig:
    """The shared ``student`` section with the method's ``overrides`` merged in."""
    section = {**settings["student"]}
    for key, value in (settings.get("overrides") or {}).get(method, {}).items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    return replace(load_section(DistillConfig, {"student": section}, "student"), seed=seed, method=method)


def _one(settings: dict, dataset: str, seed: int, d: Path, methods: list[str]) -> dict:
    data = load_section(DataConfig, settings, "data")
    teacher = replace(load_section(DistillConfig, settings, "teacher"), seed=seed)
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, dataset, d / "teacher", data_cfg=data, progress=False))
    students, paired = {}, {}
    for method in [m for m in methods if m in settings.get("methods", METHODS)]:
        source = dataset
        if method == "trajectory":  # image-free: only the teacher's own ODE trajectories
            gen = replace(load_section(GenerateTeacherDataConfig, settings, "trajectories"), seed=seed)
            source = cached(d / "trajectories", (teacher, data, gen),
                            lambda gen=gen: generate_teacher_data.run(gen, d / "teacher", dataset, d / "trajectories", data_cfg=data, progress=False))  # fmt: skip
        teachers = [d / "teacher"] if DIFFUSION_METHODS[method].teacher else []  # consistency-train learns from data alone
        student = _student(settings, method, seed)
        out = cached(d / method, (teacher, data, student, str(source)),
                     lambda student=student, source=source, method=method, teachers=teachers: distill.run(
                         student, source, d / method, data_cfg=data, teachers=teachers, progress=False))  # fmt: skip
        students[method] = out
        history = json.loads((out / "training.json").read_text()).get("history", [])
        errors = [h["paired_error"] for h in history if h.get("paired_error") is not None]
        paired[method] = (errors[0], errors[-1]) if errors else None
    ev = replace(load_section(EvaluateConfig, settings, "evaluate"), seed=seed, teacher=str(d / "teacher"))
    quiet = Console(file=io.StringIO())
    rows = {}
    for models, steps, name in (
        ([d / "teacher"], TEACHER_STEPS, "ev-teacher"),
        (list(students.values()), STUDENT_STEPS, "ev-students"),
    ):
        if not models:
            continue
        shutil.rmtree(d / name, ignore_errors=True)  # evaluations are redone on every run
        out = evaluate.run(replace(ev, step_counts=steps), models, dataset, d / name, data_cfg=data, console=quiet)
        rows.update(json.loads((out / "metrics.json").read_text()))
    return {"metrics": rows, "paired_error_first_last": paired}


def _cell(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.4g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:.4g}"


def _write_results(results: Path, lines: list[str], summary: dict) -> None:
    """``diffusion.{md,json}``; datasets this run did not touch keep their earlier sections
    (``BENCH_DATASETS=digits-images`` reruns digits without dropping moons)."""
    stem = os.environ.get("BENCH_RESULTS", "diffusion")  # another stem keeps a partial run (fewer methods or seeds) apart
    path, md = results / f"{stem}.json", results / f"{stem}.md"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = [ds for ds in earlier.get("table", {}) if ds not in summary["table"]]
    if kept and md.exists():
        sections = md.read_text().split("### ")
        lines = [f"### {sec.rstrip()}\n" for sec in sections[1:] if sec.split(" ", 1)[0] in kept] + lines
        for key in ("table", "claims", "paired_error_first_last"):
            summary[key] = {**{ds: earlier.get(key, {}).get(ds) for ds in kept if ds in earlier.get(key, {})}, **summary[key]}
        summary["datasets"] = kept + list(summary["datasets"])
    md.write_text("\n".join(lines) + "\n")
    path.write_text(json.dumps(summary, indent=2) + "\n")


MANIFOLD = ("precision", "recall", "density", "coverage")
"""Digits' fidelity / diversity columns (``stages.diffusion.metrics.manifold``): higher is better."""


def _apart(claim: str, a: str, b: str) -> tuple[tuple[str, str, str, str], ...]:
    """The claim ``a`` against ``b`` on each ``MANIFOLD`` column: fidelity and diversity apart."""
    return tuple((f"{claim}, {c} ({'diversity' if c in ('recall', 'coverage') else 'fidelity'}; higher is better)", a, b, c)
                 for c in MANIFOLD)  # fmt: skip


SECOND_WAVE = (  # (claim, A row, B row[, column]): A against B on the quality column unless named; lower is better but in MANIFOLD
    ("dmd at 1 step against the 50-step teacher (ratio; goal <= 1.5)", "dmd/steps_1", "teacher/steps_50"),
    ("phased-dmd at 2 steps against dmd at 1", "phased-dmd/steps_2", "dmd/steps_1"),
    *_apart("phased-dmd at 2 steps against dmd at 1", "phased-dmd/steps_2", "dmd/steps_1"),
    ("dual-expert against multistep at 2 steps", "dual-expert/steps_2", "multistep/steps_2"),
    ("dual-expert against multistep at 4 steps", "dual-expert/steps_4", "multistep/steps_4"),
    ("dual-expert against multistep at 2 steps, paired error to the teacher", "dual-expert/steps_2", "multistep/steps_2", "paired_error"),
    *_apart("dual-expert against multistep at 2 steps", "dual-expert/steps_2", "multistep/steps_2"),
    ("scott against consistency-distill at 1 step", "scott/steps_1", "consistency-distill/steps_1"),
    ("scott against consistency-distill at 2 steps", "scott/steps_2", "consistency-distill/steps_2"),
    ("flow-map against consistency-train at 1 step", "flow-map/steps_1", "consistency-train/steps_1"),
    ("flow-map against consistency-train at 2 steps", "flow-map/steps_2", "consistency-train/steps_2"),
)


def second_wave_claims(rows: dict[str, dict[str, list[float]]], q: str) -> dict[str, dict]:
    """Each second-wave comparison whose two rows were measured: the means, their ratio, the
    paired difference over seeds (A - B; negative: A is better, positive on a ``MANIFOLD``
    column) and whether A is better."""
    out = {}
    for claim, a, b, *column in SECOND_WAVE:
        col = column[0] if column else q
        if a in rows and b in rows and col in rows[a] and col in rows[b]:
            xa, xb = rows[a][col], rows[b][col]
            ma, mb = statistics.fmean(xa), statistics.fmean(xb)
            out[claim] = {"a": a, "b": b, "column": col, "mean_a": ma, "mean_b": mb, "ratio": ma / mb, "a_better": ma > mb if col in MANIFOLD else ma < mb,
                          "paired": paired(xa, xb)}  # fmt: skip
    return out


def _seed_rows(got: dict) -> dict[int, dict]:
    """One run's rows split by seed: seed -> dataset -> row -> column -> value (and
    ``"_paired"``: dataset -> method -> its first and last paired error)."""
    tables = got["table"] if "dataset" not in got else {got["dataset"]: got["table"]}  # the first run kept one dataset flat
    seeds = got.get("seed_list") or list(range(got["seeds"]))
    out: dict[int, dict] = {seed: {"_paired": {}} for seed in seeds}
    for dataset, by_row in tables.items():
        for row, cols in by_row.items():
            for col, values in cols.items():
                for seed, value in zip(seeds, values, strict=True):
                    out[seed].setdefault(dataset, {}).setdefault(row, {})[col] = value
    for dataset, by_method in (got.get("paired_error_first_last") or {}).items():
        for method, pes in by_method.items():
            for seed, pe in zip(seeds, pes, strict=True):
                out[seed]["_paired"].setdefault(dataset, {})[method] = pe
    return out


def _same(a: float | None, b: float | None) -> bool:
    """One teacher's figure measured twice: equal up to float rounding (a run with another
    thread count sums in another order: seed 1's teacher FD 1.658825 against 1.658827)."""
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-3)


def merge_seed_results(stems: list[str], out: str, results: Path = ROOT / "bench" / "results",
                       replace_from: list[str] = ()) -> dict:  # fmt: skip
    """One table over the seeds of several earlier runs (``bench/results/<stem>.json``, one
    seed or more each, e.g. ``BENCH_SEED_LIST=1 BENCH_RESULTS=..._seed1``): per dataset and
    row, the per-seed values appended in order; the claims recomputed with their paired
    intervals; written as ``<out>.{md,json}``. Rows measured in only some runs keep the seeds
    they have. ``replace_from`` (``BENCH_REPLACE``): runs of some methods again on some of
    those seeds (``BENCH_METHODS=...``), whose rows of those methods replace the earlier ones of
    the same seed; their teacher rows must equal the earlier ones (the same teacher), or the
    replacement would pair students of two different teachers."""
    per_seed: dict[int, dict] = {}
    for stem in stems:
        for seed, rows in _seed_rows(json.loads((results / f"{stem}.json").read_text())).items():
            if seed in per_seed:
                raise SystemExit(f"the runs {stems} share seed {seed}: each seed must come from one run")
            per_seed[seed] = rows
    for stem in replace_from:
        got = json.loads((results / f"{stem}.json").read_text())
        methods = got.get("methods") or []
        for seed, rows in _seed_rows(got).items():
            if seed not in per_seed:
                raise SystemExit(f"{stem}: seed {seed} is in none of {stems}")
            for dataset, by_row in rows.items():
                if dataset == "_paired":
                    continue
                earlier = per_seed[seed].get(dataset, {})
                for row, cols in by_row.items():
                    model = row.rsplit("/steps_", 1)[0]
                    if model in methods:
                        earlier[row] = cols
                    elif row in earlier and not _same(cols.get(_quality(dataset)), earlier[row].get(_quality(dataset))):
                        raise SystemExit(f"{stem}: seed {seed}'s {row} differs from the earlier run's "
                                         f"({cols.get(_quality(dataset))} against {earlier[row].get(_quality(dataset))}): not the same teacher")  # fmt: skip
            for dataset, by_method in rows["_paired"].items():
                per_seed[seed]["_paired"].setdefault(dataset, {}).update({m: pe for m, pe in by_method.items() if m in methods})
    seeds = list(per_seed)
    table: dict = {}
    paired_pe: dict = {}
    for seed in seeds:
        for dataset, by_row in per_seed[seed].items():
            if dataset == "_paired":
                continue
            for row, cols in by_row.items():
                for col, value in cols.items():
                    table.setdefault(dataset, {}).setdefault(row, {}).setdefault(col, []).append(value)
        for dataset, by_method in per_seed[seed]["_paired"].items():
            for method, pe in by_method.items():
                paired_pe.setdefault(dataset, {}).setdefault(method, []).append(pe)
    lines, claims = _report(table, paired_pe, seeds)
    summary = {"seeds": len(seeds), "seed_list": seeds, "merged_from": stems, "datasets": list(table), "claims": claims,
               "paired_error_first_last": paired_pe, "table": table}  # fmt: skip
    if replace_from:
        summary["replaced_from"] = list(replace_from)
    (results / f"{out}.md").write_text("\n".join(lines) + "\n")
    (results / f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _report(table: dict, paired: dict, seeds: list[int]) -> tuple[list[str], dict]:
    """The markdown tables and the claims of per-dataset rows ``table`` over ``seeds``."""
    lines, claims = [], {}
    for dataset, rows in table.items():
        q = _quality(dataset)
        # runs from before these columns have none: their tables read as they did
        higher = [c for c in MANIFOLD if any(c in cols for cols in rows.values())]
        shown = [c for c in (f"{q}_at_floor_n",) if any(c in cols for cols in rows.values())] + higher
        names = [c.replace("_at_floor_n", " at the floor's n") for c in shown]
        lines += [f"### {dataset} (mean ± std over {len(seeds)} seeds; {q}: lower is better"
                  + (f"; {', '.join(higher)}: higher is better)" if higher else ")"), "",
                  f"| model | steps | {q} | {' | '.join(names + [''])}paired error to teacher@50 | seconds per 1k samples |",
                  "|---|---|---|" + "---|" * len(shown) + "---|---|"]  # fmt: skip
        for key, cols in rows.items():
            model, steps = key.rsplit("/steps_", 1)
            lines.append(f"| {model} | {steps if steps != '0' else 'held-out data'} | {_cell(cols[q])} | "
                         + "".join(f"{_cell(cols[c]) if c in cols else ''} | " for c in shown)
                         + f"{_cell(cols['paired_error']) if 'paired_error' in cols else ''} | "
                         f"{_cell(cols['seconds_per_1k']) if 'seconds_per_1k' in cols else ''} |")  # fmt: skip
        lines.append("")
        t1, t50 = rows.get("teacher/steps_1"), rows.get("teacher/steps_50")
        cd = rows.get("consistency-distill/steps_1")
        if t1 and t50 and cd:
            mean = {k: statistics.fmean(v[q]) for k, v in (("t1", t1), ("t50", t50), ("cd", cd))}
            claims[dataset] = {
                "cd1_over_teacher50": mean["cd"] / mean["t50"],
                "cd1_within_1.5x_of_teacher50": mean["cd"] <= 1.5 * mean["t50"],
                "cd1_below_half_of_teacher1": mean["cd"] < 0.5 * mean["t1"],
                "speedup_cd1_vs_teacher50": statistics.fmean(t50["seconds_per_1k"]) / statistics.fmean(cd["seconds_per_1k"]),
                "paired_error_fell": all(pe is not None and pe[1] < pe[0] for pe in paired.get(dataset, {}).get("consistency-distill", [None])),
            }  # fmt: skip
        wave = second_wave_claims(rows, q)
        if wave:
            claims.setdefault(dataset, {})["second_wave"] = wave
            lines += ["| claim | A | B | ratio A / B | A better | A - B [95% CI over seeds] |", "|---|---|---|---|---|---|"]
            lines += [f"| {c} | {v['mean_a']:.4g} | {v['mean_b']:.4g} | {v['ratio']:.3g} | {v['a_better']} | {paired_cell(v['paired'])} |"
                      for c, v in wave.items()]  # fmt: skip
            lines.append("")
    return lines, claims


def main() -> int:
    merge = _env_list("BENCH_MERGE", ())
    if merge:  # BENCH_MERGE=a,b,c BENCH_RESULTS=out: only merge earlier runs' tables
        summary = merge_seed_results(merge, os.environ.get("BENCH_RESULTS", "diffusion"), replace_from=_env_list("BENCH_REPLACE", ()))
        emit("diffusion", **{k: v for k, v in summary.items() if k != "table"})
        return 0
    settings = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "bench" / "diffusion.yaml")).read_text())
    seeds = seed_list()
    datasets = _env_list("BENCH_DATASETS", tuple(settings))
    methods = [m for m in _env_list("BENCH_METHODS", METHODS) if m in METHODS]
    t0 = time.perf_counter()
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    paired: dict[str, dict[str, list]] = {}
    with workdir() as tmp:
        for dataset in datasets:
            for seed in seeds:
                got = _one(settings[dataset], dataset, seed, tmp / f"{dataset}-{seed}", methods)
                for key, m in got["metrics"].items():
                    q = _quality(dataset)
                    if key == "floor":  # held-out data, measured at its own n
                        key, m = "floor/steps_0", {**m, f"{q}_at_floor_n": m.get(q)}
                    for col in (q, f"{q}_at_floor_n", "seconds_per_1k", "paired_error", *MANIFOLD):
                        if m.get(col) is not None:
                            table.setdefault(dataset, {}).setdefault(key, {}).setdefault(col, []).append(float(m[col]))
                for method, pe in got["paired_error_first_last"].items():
                    paired.setdefault(dataset, {}).setdefault(method, []).append(pe)
    lines, claims = _report(table, paired, seeds)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    summary = {"seeds": len(seeds), "seed_list": seeds, "datasets": datasets, "methods": methods, "claims": claims,
               "paired_error_first_last": paired, "seconds": time.perf_counter() - t0}  # fmt: skip
    _write_results(results, lines, {**summary, "table": table})
    emit("diffusion", **summary)
    return 0
