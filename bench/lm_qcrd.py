"""``qcrd`` against ``sft`` on the same positives, over seeds (issue 20: qcrd >= sft).

Per seed, the default pipeline's LM chain (``bench.harness.lm_teacher_chain``: params.yaml's
teacher, its 4 samples per prompt, the label-free ``majority+dedup`` selection), then two
students of ``lm_student``'s size and budget on that selection: ``sft`` (CE on the selected
samples) and ``qcrd`` (the same samples as positives, which its own self-consistency filter
keeps unchanged, plus negatives from the student ``qcrd.lag`` steps back and the discriminator's
weights). Test accuracy by the task's scorer.

    python -m bench lm_qcrd            # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_qcrd
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.harness import accuracy_table, cached, emit, lm_accuracies, lm_teacher_chain, paired, workdir
from stages import distill
from stages.config import DataConfig, DistillConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, params, "data")
    t0 = time.perf_counter()
    acc: dict[str, list[float]] = {}
    contrast: list[dict] = []
    with workdir() as d:
        for seed in seeds:
            s = d / f"s{seed}"
            teacher, gen, sel = lm_teacher_chain(params, seed, s, TASK)
            models = {"teacher": s / "teacher"}
            for method in ("sft", "qcrd"):
                cfg = replace(load_section(DistillConfig, params, "lm_student"), method=method, seed=seed)
                out = s / method
                cached(out, (teacher, gen, sel, cfg), lambda c=cfg, o=out, g=s / "sel": distill.run(c, g, o, data_cfg=data, progress=False))
                models[method] = out
            for name, a in lm_accuracies(params, models, TASK, s / "ev", data).items():
                acc.setdefault(name, []).append(a)
            summary = json.loads((s / "qcrd" / "training.json").read_text())
            contrast.append({k: v for k, v in summary.items() if k.startswith("qcrd_")})
    claim = {"qcrd": statistics.fmean(acc["qcrd"]), "sft": statistics.fmean(acc["sft"]), **paired(acc["qcrd"], acc["sft"])}
    results = ROOT / "bench" / "results"
    (results / "lm_qcrd.md").write_text(accuracy_table(acc, len(seeds)))
    summary = {"seeds": len(seeds), "task": TASK, "accuracy": acc, "qcrd_vs_sft": claim, "qcrd_training": contrast,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (results / "lm_qcrd.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_qcrd", **summary)
    return 0
