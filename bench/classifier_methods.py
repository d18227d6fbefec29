"""Every classifier method on digits and long-tailed digits, 3 seeds, same student and
epoch budget, in one process: the table README.md shows.

    python -m bench classifier_methods                 # writes bench/results/classifier_methods.{json,md}
    BENCH_SEEDS=1 python -m bench classifier_methods   # a quicker look

Per data set: one CNN teacher per seed (the ``teacher`` section of params.yaml; two
seeds serve as ``mst``'s specialists), its teacher data, then each method trains the
``distill`` section's student. Reported per method: test accuracy, balanced accuracy,
few-shot accuracy, ECE (mean and std over seeds) and training seconds; plus
self-distillation accuracy per generation and the random teacher's probe accuracy.
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
from stages import distill, evaluate, generate_teacher_data
from stages.config import DataConfig, DistillConfig, EvaluateConfig, GenerateTeacherDataConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# name -> (distill method, config overrides, uses live teachers)
RUNS: dict[str, tuple[str, dict, bool]] = {
    "ce": ("ce", {}, False),
    "kd": ("kd", {}, False),
    "pld": ("pld", {}, False),
    "ssld": ("ssld", {}, False),
    "pskd": ("pskd", {}, False),
    "ce (best dev epoch)": ("ce", {"checkpoint": "best"}, False),
    "pskd (best dev epoch)": ("pskd", {"checkpoint": "best"}, False),
    "self-distill": ("self-distill", {"generations": 4}, False),
    "self-distill (a=0)": ("self-distill", {"generations": 4, "gt_weight": 0.0}, False),
    "anchored": ("anchored", {"generations": 4}, False),
    "random-teacher": ("random-teacher", {}, False),
    "random-teacher (3 layers)": ("random-teacher", {"depth": 3}, False),
    "sla-sd": ("sla-sd", {}, False),
    "mdcs": ("mdcs", {"experts": 3}, False),
    "mst": ("mst", {}, True),
}
DATASETS = {"digits": 0.0, "digits-LT50": 50.0}


def _ms(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if x is not None]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0} if xs else {}


def _eval(models: list[Path], data: Path, out: Path, data_cfg: DataConfig) -> dict:
    ev = evaluate.run(EvaluateConfig(), models, data, out, data_cfg=data_cfg, console=Console(file=io.StringIO()))
    return json.loads((ev / "metrics.json").read_text())


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = list(range(int(os.environ.get("BENCH_SEEDS", "3"))))
    only = [r for r in os.environ.get("BENCH_METHODS", "").split(",") if r] or list(RUNS)
    teacher_cfg = load_section(DistillConfig, params, "teacher")
    student_cfg = load_section(DistillConfig, params, "distill")
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for ds, ratio in DATASETS.items():
            data_cfg = replace(load_section(DataConfig, params, "data"), long_tail=ratio)
            # the same number of optimiser steps on the smaller long-tailed train split
            scale = _train_rows(replace(data_cfg, long_tail=0.0)) / _train_rows(data_cfg)
            t_cfg = replace(teacher_cfg, epochs=round(teacher_cfg.epochs * scale))
            s_cfg = replace(student_cfg, epochs=round(student_cfg.epochs * scale))
            rows: dict[str, dict[str, list]] = {name: {} for name in only}
            teacher_acc = []
            for seed in seeds:
                d = root / ds / f"s{seed}"
                for k in (0, 1):  # two teachers per seed: the first teaches, both serve mst
                    distill.run(
                        replace(t_cfg, seed=seed * 10 + k), "digits", d / f"teacher{k}", data_cfg=data_cfg, progress=False
                    )
                generate_teacher_data.run(
                    GenerateTeacherDataConfig(), d / "teacher0", "digits", d / "td", data_cfg=data_cfg, progress=False
                )
                teacher_acc.append(_eval([d / "teacher0"], d / "td", d / "ev-teacher", data_cfg)["teacher0"]["accuracy"])
                for name in only:
                    method, over, live = RUNS[name]
                    model = replace(s_cfg.model, experts=over.get("experts", 1), depth=over.get("depth", s_cfg.model.depth))
                    rest = {k: v for k, v in over.items() if k not in ("experts", "depth")}
                    cfg = replace(s_cfg, method=method, seed=seed, model=model, **rest)
                    out = d / name.replace(" ", "_")
                    t0 = time.perf_counter()
                    teachers = [d / "teacher0", d / "teacher1"] if live else []
                    distill.run(cfg, d / "td", out, data_cfg=data_cfg, teachers=teachers, progress=False)
                    seconds = time.perf_counter() - t0
                    m = _eval([out], d / "td", d / f"ev-{out.name}", data_cfg)[out.name]
                    r = rows[name]
                    for key in ("accuracy", "balanced_accuracy", "few_shot_accuracy", "ece"):
                        r.setdefault(key, []).append(m.get(key))
                    r.setdefault("train_seconds", []).append(seconds)
                    training = json.loads((out / "training.json").read_text())
                    if method == "self-distill":
                        gens = sorted(p.name for p in (out / "generations").iterdir())
                        per_gen = _eval([out / "generations" / g for g in gens], d / "td", d / f"ev-{out.name}-gens", data_cfg)
                        r.setdefault("accuracy_per_generation", []).append([per_gen[g]["accuracy"] for g in gens])
                        r.setdefault("gt_weight_per_generation", []).append([g["gt_weight"] for g in training["generations"]])
                    if method == "anchored":
                        r.setdefault("kl_to_base_per_generation", []).append(
                            [g["kl_to_base_dev"] for g in training["generations"]]
                        )
                    if method == "random-teacher":
                        probe = _eval([out / "random_teacher"], d / "td", d / f"ev-{out.name}-teacher", data_cfg)[
                            "random_teacher"
                        ]
                        r.setdefault("teacher_probe_accuracy", []).append(probe["accuracy"])
            summary = {}
            for name, r in rows.items():
                s = {
                    k: _ms(v)
                    for k, v in r.items()
                    if k
                    in ("accuracy", "balanced_accuracy", "few_shot_accuracy", "ece", "train_seconds", "teacher_probe_accuracy")
                }
                for k in ("accuracy_per_generation", "gt_weight_per_generation", "kl_to_base_per_generation"):
                    if k in r:
                        s[k] = [statistics.fmean(col) for col in zip(*r[k], strict=True)]
                summary[name] = s
            results[ds] = {"teacher_accuracy": _ms(teacher_acc), "methods": summary}
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "classifier_methods.json"
    if os.environ.get("BENCH_METHODS") and previous.exists():  # a subset run updates its rows of the last full run
        merged = json.loads(previous.read_text())
        for ds, block in results.items():
            merged.setdefault(ds, block)["methods"].update(block["methods"])
            merged[ds]["methods"] = {k: merged[ds]["methods"][k] for k in RUNS if k in merged[ds]["methods"]}
        results = merged
    (RESULTS / "classifier_methods.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "classifier_methods.md").write_text(markdown(results, len(seeds)))
    d, lt = results.get("digits", {}).get("methods", {}), results.get("digits-LT50", {}).get("methods", {})

    def mean(table, name, key):
        return table.get(name, {}).get(key, {}).get("mean")

    claims = {
        "kd_beats_ce": _gt(mean(d, "kd", "accuracy"), mean(d, "ce", "accuracy")),
        "pld_beats_ce": _gt(mean(d, "pld", "accuracy"), mean(d, "ce", "accuracy")),
        "mdcs_beats_ce_balanced_lt": _gt(mean(lt, "mdcs", "balanced_accuracy"), mean(lt, "ce", "balanced_accuracy")),
        "mdcs_beats_ce_few_shot_lt": _gt(mean(lt, "mdcs", "few_shot_accuracy"), mean(lt, "ce", "few_shot_accuracy")),
        "pskd_lower_ece_than_ce": _gt(mean(d, "ce", "ece"), mean(d, "pskd", "ece")),
        "pskd_lower_ece_than_ce_best_dev_epoch": _gt(
            mean(d, "ce (best dev epoch)", "ece"), mean(d, "pskd (best dev epoch)", "ece")
        ),
        "random_teacher_student_probe_beats_teacher": _gt(
            mean(d, "random-teacher", "accuracy"), mean(d, "random-teacher", "teacher_probe_accuracy")
        ),
    }
    emit("classifier_methods", seeds=len(seeds), seconds=time.perf_counter() - t_start, claims=claims,
         results=str(RESULTS / "classifier_methods.md"))  # fmt: skip
    return 0


def _train_rows(data_cfg: DataConfig) -> int:
    from stages.tasks import load_examples

    return load_examples("digits", data_cfg).split("train").num_rows


def _gt(a, b):
    return None if a is None or b is None else a > b


def markdown(results: dict, seeds: int) -> str:
    lines = []
    for ds, block in results.items():
        t = block["teacher_accuracy"]
        lines += [f"**{ds}** (teacher test accuracy {t['mean']:.4f} ± {t['std']:.4f}; mean ± std over {seeds} seeds)", ""]
        lines += ["| method | accuracy | balanced acc. | few-shot acc. | ECE | train s |", "|---|---|---|---|---|---|"]
        for name, s in block["methods"].items():
            cells = [
                f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" if s.get(k) else "-"
                for k in ("accuracy", "balanced_accuracy", "few_shot_accuracy", "ece")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['train_seconds']['mean']:.1f} |")
        lines.append("")
        for name, s in block["methods"].items():
            if "accuracy_per_generation" in s:
                gens = ", ".join(f"{a:.4f}" for a in s["accuracy_per_generation"])
                weights = ", ".join(f"{a:.2f}" for a in s["gt_weight_per_generation"])
                lines.append(f"- {name}: test accuracy by generation [{gens}], gold weight by generation [{weights}]")
            if "kl_to_base_per_generation" in s:
                lines.append(
                    f"- {name}: dev KL to the base teacher by generation ["
                    + ", ".join(f"{k:.4f}" for k in s["kl_to_base_per_generation"])
                    + "]"
                )
            if "teacher_probe_accuracy" in s:
                lines.append(
                    f"- {name}: probe accuracy of the random teacher {s['teacher_probe_accuracy']['mean']:.4f}, of its student {s['accuracy']['mean']:.4f}"
                )
        lines.append("")
    return "\n".join(lines)
