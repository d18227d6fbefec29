"""Meta-DMoE on digits domains (issue 22): does test-time adaptation help on an unseen domain?

Per seed: one expert per source domain (the ``teacher`` section's network, ``ce`` on that domain
alone), ``meta-dmoe`` (the ``distill`` section's student, ``meta_target`` the unseen domain) and,
for reference, plain ``ce`` of the same student on every source domain (ERM). Each is tested
with ``distil evaluate`` on the unseen domain's test split: the adapted student, the same
student before adaptation (``unadapted/``) and ERM.

    python -m bench meta_dmoe            # 3 seeds
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
SOURCES = ["none", "rot90", "flip", "invert"]
ADAPT = {"1 step at 0.1 (defaults)": {}, "3 steps at 0.5": {"adapt_steps": 3, "adapt_lr": 0.5}}
"""The test-time adaptation settings each seed's meta-dmoe is trained and adapted with."""
TARGET = "transpose"
"""Unseen: the transpose is a flip of a 90-degree rotation, so two experts know parts of it."""


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, params, "data")
    sources, target = replace(data, domains=SOURCES), replace(data, domains=[TARGET])
    expert_cfg = replace(load_section(DistillConfig, params, "teacher"), method="ce")
    student = load_section(DistillConfig, params, "distill")
    acc: dict[str, list[float]] = {"ERM (ce on the sources)": []}
    expert_acc: dict[str, list[float]] = {d: [] for d in SOURCES}
    dev: dict[str, list[tuple[float, float]]] = {a: [] for a in ADAPT}
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            experts = []
            for dom in SOURCES:
                cfg, own = replace(expert_cfg, seed=seed), replace(data, domains=[dom])
                out = d / f"expert-{dom}"
                cached(out, (cfg, own), lambda c=cfg, o=out, dc=own: distill.run(c, "digits", o, data_cfg=dc, progress=False))
                expert_acc[dom].append(digits_accuracy(out, d / f"ev-expert-{dom}", target))
                experts.append(out)
            for i, (name, over) in enumerate(ADAPT.items()):
                meta = replace(student, method="meta-dmoe", seed=seed, meta_target=TARGET, **over)
                m = d / ("meta" if i == 0 else f"meta{i}")
                cached(m, (meta, sources), lambda c=meta, o=m, e=experts: distill.run(c, "digits", o, data_cfg=sources, teachers=e, progress=False))
                acc.setdefault(f"meta-dmoe adapted, {name}", []).append(digits_accuracy(m, d / f"ev-adapted{i}", target))
                acc.setdefault(f"meta-dmoe unadapted, {name}", []).append(digits_accuracy(m / "unadapted", d / f"ev-unadapted{i}", target))
                s = json.loads((m / "training.json").read_text())
                dev[name].append((s["target_dev_accuracy_unadapted"], s["target_dev_accuracy_adapted"]))
            erm = replace(student, method="ce", seed=seed)
            cached(d / "erm", (erm, sources), lambda c=erm, o=d / "erm": distill.run(c, "digits", o, data_cfg=sources, progress=False))
            acc["ERM (ce on the sources)"].append(digits_accuracy(d / "erm", d / "ev-erm", target))
    gains = {name: paired(acc[f"meta-dmoe adapted, {name}"], acc[f"meta-dmoe unadapted, {name}"]) for name in ADAPT}
    vs_erm = {name: paired(acc[f"meta-dmoe adapted, {name}"], acc["ERM (ce on the sources)"]) for name in ADAPT}
    out = {"seeds": len(seeds), "sources": SOURCES, "target": TARGET, "adapt": ADAPT, "test_accuracy_on_target": acc,
           "experts_on_target": expert_acc, "target_dev_unadapted_adapted": dev,
           "adapted_minus_unadapted": gains, "adapted_minus_erm": vs_erm, "seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"### Meta-DMoE on digits: sources {', '.join(SOURCES)}; unseen domain {TARGET} ({len(seeds)} seeds, its test split)",
             "", "| model | mean | std | per seed |", "|---|---|---|---|"]  # fmt: skip
    rows = {**acc, **{f"expert on {k}": v for k, v in expert_acc.items()}}
    for name, xs in rows.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(xs):.4f} | {sd:.4f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    write_results("meta_dmoe", out, lines)
    return 0
