"""Cross-tokenizer distillation on the embedded reasoning task, over seeds, in one process.

Per seed: the demo's LM teacher (``lm_teacher``) and its selected samples with top-k
log-probs (``lm_generate``, ``lm_select``), exactly as ``bench lm_students``; then three
students of the ``lm_student`` size and step budget that do NOT share the teacher's
tokenizer (their own BPE of ``STUDENT_VOCAB`` tokens, trained on other text): ``sft`` on
the teacher's samples (text, re-tokenised), ``uld`` and ``span-kd`` (the stored top-k,
compared on spans aligned by characters, ``stages.lm.alignment``). Test accuracy by the
task's scorer; the claim is cross-tokenizer KD > sft on the same samples, as paired
differences over seeds.

Writes ``bench/results/cross_tokenizer.{md,json}``.

    python -m bench cross_tokenizer                 # 3 seeds, about 12 minutes on 2 cores
    BENCH_SEEDS=1 BENCH_WORKDIR=/tmp/xt python -m bench cross_tokenizer
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
STUDENT_VOCAB = 300
METHODS = ("sft", "uld", "span-kd")


def _student_tokenizer(d: Path) -> Path:
    """A BPE the teacher never used: trained on differently worded arithmetic, another size."""
    from stages.lm.models import train_tokenizer

    out = d / "student_tokenizer"
    if not (out / "tokenizer.json").exists():
        texts = [f"{a} plus {b} plus {c} gives {a + b + c}. Sum = {a + b + c}!" for a in range(10) for b in range(10) for c in range(10)]
        train_tokenizer(texts, STUDENT_VOCAB, out=out)
    return out


def _one_seed(params: dict, seed: int, d: Path) -> dict[str, float]:
    data = load_section(DataConfig, params, "data")
    teacher, gen, sel = lm_teacher_chain(params, seed, d, TASK)
    tok = _student_tokenizer(d.parent)
    base = replace(load_section(DistillConfig, params, "lm_student"), seed=seed)
    student = replace(base, lm=replace(base.lm, tokenizer=str(tok)))
    names = {"teacher": d / "teacher"}
    for method in METHODS:
        cfg = replace(student, method=method)
        out = d / method
        cached(out, (teacher, gen, sel, cfg), lambda cfg=cfg, out=out: distill.run(cfg, d / "sel", out, data_cfg=data, progress=False))
        names[method] = out
    return lm_accuracies(params, names, TASK, d / "ev", data)


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "params.yaml")).read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    t0, acc = time.perf_counter(), {}
    with workdir() as d:
        for seed in seeds:
            for name, a in _one_seed(params, seed, d / f"s{seed}").items():
                acc.setdefault(name, []).append(a)
    claims = {f"{m}_beats_sft_same_samples": {"holds": statistics.fmean(acc[m]) > statistics.fmean(acc["sft"]), **paired(acc[m], acc["sft"])}
              for m in ("uld", "span-kd")}  # fmt: skip
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "cross_tokenizer.md").write_text(accuracy_table(acc, len(seeds)))
    summary = {"seeds": len(seeds), "task": TASK, "student_vocab": STUDENT_VOCAB, "accuracy": acc,
               "mean": {k: statistics.fmean(v) for k, v in acc.items()}, **claims, "seconds": time.perf_counter() - t0}  # fmt: skip
    (results / "cross_tokenizer.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("cross_tokenizer", **summary)
    return 0
