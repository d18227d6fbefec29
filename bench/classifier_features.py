"""Intermediate-representation distillation on digits (issue 22): ``hybrid`` against the better
single-teacher ``kd``, ``mi-alpha`` against the plain feature MSE of ``fitnet``, and ``competitive``
against ``kd``, in one process.

Per seed: two teachers of different inductive biases trained with ``ce`` (a CNN and a wide MLP),
then students of one architecture (the ``distill`` section's MLP, the same epochs): ``kd`` from
each teacher, ``fitnet``, ``mi-alpha`` and ``competitive`` from the CNN, and ``hybrid`` both ways round (relations
from the MLP and features from the CNN, and the reverse). Test accuracy from ``distil evaluate``;
paired intervals over seeds.

    python -m bench classifier_features            # 5 seeds
    BENCH_SEEDS=2 python -m bench classifier_features
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

from bench.harness import cached, paired, workdir, write_results
from stages import distill, evaluate
from stages.config import DataConfig, DistillConfig, EvaluateConfig, ModelConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = {"cnn": ModelConfig(arch="cnn", width=32, depth=2), "mlp": ModelConfig(arch="mlp", width=256, depth=2)}
STUDENTS = {  # name -> (method, teachers)
    "kd (cnn)": ("kd", ["cnn"]),
    "kd (mlp)": ("kd", ["mlp"]),
    "fitnet (cnn)": ("fitnet", ["cnn"]),
    "mi-alpha (cnn)": ("mi-alpha", ["cnn"]),
    "hybrid (relations mlp, features cnn)": ("hybrid", ["mlp", "cnn"]),
    "hybrid (relations cnn, features mlp)": ("hybrid", ["cnn", "mlp"]),
    "competitive (cnn)": ("competitive", ["cnn"]),
}


def digits_metrics(model: Path, out: Path, data_cfg: DataConfig) -> dict:
    """``distil evaluate``'s metrics of the model on the digits test split."""
    ev = evaluate.run(EvaluateConfig(), [model], "digits", out, data_cfg=data_cfg, console=Console(file=io.StringIO()))
    return json.loads((ev / "metrics.json").read_text())[model.name]


def digits_accuracy(model: Path, out: Path, data_cfg: DataConfig) -> float:
    """The model's accuracy on the digits test split, from ``distil evaluate``."""
    return float(digits_metrics(model, out, data_cfg)["accuracy"])


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "5")))
    data = load_section(DataConfig, params, "data")
    teacher_cfg = replace(load_section(DistillConfig, params, "teacher"), method="ce", epochs=30)
    student_cfg = load_section(DistillConfig, params, "distill")
    acc: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            for name, model in TEACHERS.items():
                cfg = replace(teacher_cfg, model=model, seed=seed)
                cached(d / name, (cfg, data), lambda c=cfg, o=d / name: distill.run(c, "digits", o, data_cfg=data, progress=False))
                acc.setdefault(f"teacher {name}", []).append(digits_accuracy(d / name, d / f"ev-{name}", data))
            for label, (method, teachers) in STUDENTS.items():
                out = d / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                cfg = replace(student_cfg, method=method, seed=seed)
                paths = [d / t for t in teachers]
                cached(out, (cfg, data, teachers),
                       lambda c=cfg, o=out, p=paths: distill.run(c, "digits", o, data_cfg=data, teachers=p, progress=False))  # fmt: skip
                acc.setdefault(label, []).append(digits_accuracy(out, d / f"ev-{out.name}", data))
    best_kd = "kd (cnn)" if statistics.fmean(acc["kd (cnn)"]) >= statistics.fmean(acc["kd (mlp)"]) else "kd (mlp)"
    claims = {
        f"hybrid (relations mlp, features cnn) - {best_kd}": paired(acc["hybrid (relations mlp, features cnn)"], acc[best_kd]),
        f"hybrid (relations cnn, features mlp) - {best_kd}": paired(acc["hybrid (relations cnn, features mlp)"], acc[best_kd]),
        "mi-alpha (cnn) - fitnet (cnn)": paired(acc["mi-alpha (cnn)"], acc["fitnet (cnn)"]),
        "fitnet (cnn) - kd (cnn)": paired(acc["fitnet (cnn)"], acc["kd (cnn)"]),
        "competitive (cnn) - kd (cnn)": paired(acc["competitive (cnn)"], acc["kd (cnn)"]),
    }
    lines = [f"### Intermediate-representation distillation on digits ({len(seeds)} seeds, test accuracy)", "",
             "| model | mean | std | per seed |", "|---|---|---|---|"]  # fmt: skip
    for name, xs in acc.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(xs):.4f} | {sd:.4f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    lines += ["", "| claim | mean difference | 95% interval | excludes 0 |", "|---|---|---|---|"]
    for name, c in claims.items():
        ci = "" if c["interval"] is None else f"[{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]"
        lines.append(f"| {name} | {c['mean_diff']:+.4f} | {ci} | {c['excludes_zero']} |")
    summary = {"seeds": len(seeds), "accuracy": acc, "claims": claims, "seconds": time.perf_counter() - t0}
    write_results("classifier_features", summary, lines)
    return 0
