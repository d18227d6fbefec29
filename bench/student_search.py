"""Student architecture search without training (DisWOT, issue 22): the searched student against
the hand-picked one of the same parameter budget, after the same KD training, on digits.

Per seed: the ``teacher`` section's CNN; the ``distill`` section's MLP trained with ``kd`` (the
hand-picked student); and ``student-search`` within that MLP's parameter count, whose winner is
trained with the same ``kd`` settings. Test accuracy from ``distil evaluate``, the paired
difference over seeds, and the search's seconds as a share of the winner's training.

    python -m bench student_search            # 5 seeds
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


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "5")))
    data = load_section(DataConfig, params, "data")
    teacher_cfg = load_section(DistillConfig, params, "teacher")
    student_cfg = load_section(DistillConfig, params, "distill")
    acc: dict[str, list[float]] = {"teacher": [], "hand-picked": [], "searched": []}
    winners, shares = [], []
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            t = replace(teacher_cfg, seed=seed)
            cached(d / "teacher", (t, data), lambda c=t, o=d / "teacher": distill.run(c, "digits", o, data_cfg=data, progress=False))
            for name, method in (("hand-picked", "kd"), ("searched", "student-search")):
                cfg = replace(student_cfg, method=method, seed=seed)
                cached(d / name, (t, cfg, data), lambda c=cfg, o=d / name, p=d / "teacher": distill.run(
                    c, "digits", o, data_cfg=data, teachers=[p], progress=False))  # fmt: skip
            for name in acc:
                acc[name].append(digits_accuracy(d / name, d / f"ev-{name}", data))
            summary = json.loads((d / "searched" / "training.json").read_text())
            w = summary["search"]["winner"]
            winners.append(f"{w['arch']} {w['width']}x{w['depth']} ({w['params']} params)")
            shares.append(summary["search_cost_share"])
    budget = json.loads((root / "s0" / "searched" / "training.json").read_text())["search"]["budget"] if seeds else None
    claim = paired(acc["searched"], acc["hand-picked"])
    out = {"seeds": len(seeds), "budget": budget, "accuracy": acc, "winners": winners,
           "searched_minus_hand_picked": claim, "search_cost_share": {"mean": statistics.fmean(shares), "max": max(shares)},
           "seconds": time.perf_counter() - t0}  # fmt: skip
    write_results("student_search", out)
    return 0
