"""Dataset distillation on digits (issue 22): 10 synthetic images per class learnt by trajectory
matching against 10 random real images per class and against the full train split.

Per seed: ``dataset-distill`` (``images_per_class`` 10, the defaults), the same with
``dd_iterations=0`` (its starting point: random real rows, the baseline), and ``ce`` on the whole
train split; every student is the ``distill`` section's MLP, tested with ``distil evaluate``.

    python -m bench dataset_distill            # 3 seeds
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.classifier_features import digits_accuracy
from bench.harness import cached, paired, workdir, write_results
from stages import distill
from stages.config import DataConfig, DistillConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"distilled (10 per class)": ("dataset-distill", {}), "random real (10 per class)": ("dataset-distill", {"dd_iterations": 0}),
        "full train split": ("ce", {})}  # fmt: skip


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, params, "data")
    student = load_section(DistillConfig, params, "distill")
    acc: dict[str, list[float]] = {name: [] for name in RUNS}
    match: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            for name, (method, over) in RUNS.items():
                cfg = replace(student, method=method, seed=seed, **over)
                out = d / name.split(" (")[0].replace(" ", "_")
                cached(out, (cfg, data), lambda c=cfg, o=out: distill.run(c, "digits", o, data_cfg=data, progress=False))
                acc[name].append(digits_accuracy(out, d / f"ev-{out.name}", data))
            s = json.loads((d / "distilled" / "training.json").read_text())
            match.append((s["match_loss_first"], s["match_loss_last"]))
    full, syn, rnd = (acc[k] for k in ("full train split", "distilled (10 per class)", "random real (10 per class)"))
    out = {"seeds": len(seeds), "accuracy": acc, "match_loss_first_last": match,
           "distilled_minus_random": paired(syn, rnd), "full_minus_distilled": paired(full, syn),
           "full_minus_random": paired(full, rnd), "seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"### Dataset distillation on digits ({len(seeds)} seeds, test accuracy of the same MLP)", "",
             "| training set | mean | std | per seed |", "|---|---|---|---|"]  # fmt: skip
    for name, xs in acc.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(xs):.4f} | {sd:.4f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    write_results("dataset_distill", out, lines)
    return 0
