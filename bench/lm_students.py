"""LM students on the embedded reasoning task, over seeds, in one process: the accuracy
claims of the LM issue, with the settings of params.yaml's LM sections.

Per seed: a teacher trained on the gold answers (``lm_teacher``); its samples with top-k
log-probs on the gold prompts plus ``data.unlabeled`` prompts whose answers are withheld
(``lm_generate``); a label-free selection (``lm_select``); then students of one smaller
size (``lm_student``, the same optimiser-step budget each): ``sft`` on gold only, ``sft``
on the selected teacher samples, token-level methods from the stored top-k, and
``on-policy`` against the live teacher, starting from the ``sft`` student for
``lm_on_policy.steps`` more steps (GKD's recipe). Test accuracy by the task's own scorer.

Writes ``bench/results/lm_students.{md,json}`` and prints one JSON line with per-seed
accuracies, means, standard deviations and the claims as booleans.

    python -m bench lm_students                  # 3 seeds, about 15 minutes on 2 cores
    BENCH_SEEDS=1 BENCH_METHODS=kd python -m bench lm_students
    BENCH_PARAMS=other.yaml python -m bench lm_students   # another params file
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

from bench.harness import accuracy_table, emit, lm_accuracies, paired
from stages import distill, generate_teacher_data, select
from stages.config import DataConfig, DistillConfig, GenerateTeacherDataConfig, SelectConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"
FROM_TEACHER_DATA = ("sft", "kd", "reverse-kl", "jsd", "on-policy")
"""In this order: on-policy starts from the sft student."""


def _students() -> list[str]:
    wanted = os.environ.get("BENCH_METHODS", ",".join(FROM_TEACHER_DATA)).split(",")
    if "on-policy" in wanted and "sft" not in wanted:
        wanted.insert(0, "sft")
    return [m for m in FROM_TEACHER_DATA if m in wanted]


def _one_seed(params: dict, seed: int, d: Path, methods: list[str]) -> dict[str, float]:
    data = load_section(DataConfig, params, "data")
    teacher = replace(load_section(DistillConfig, params, "lm_teacher"), seed=seed)
    distill.run(teacher, TASK, d / "teacher", data_cfg=data, progress=False)
    gen = replace(load_section(GenerateTeacherDataConfig, params, "lm_generate"), seed=seed)
    generate_teacher_data.run(gen, d / "teacher", TASK, d / "td", data_cfg=data, progress=False)
    select.run(load_section(SelectConfig, params, "lm_select"), d / "td", d / "sel", progress=False)
    student = replace(load_section(DistillConfig, params, "lm_student"), seed=seed)
    distill.run(replace(student, method="sft"), TASK, d / "gold", data_cfg=data, progress=False)
    names = {"teacher": d / "teacher", "sft-gold": d / "gold"}
    for method in methods:
        out = d / f"{method}-teacher-data"
        cfg, live = replace(student, method=method), []
        if method == "on-policy":  # GKD's recipe, as the pipeline: start from the sft student on teacher samples
            live = [d / "teacher"]
            cfg = replace(cfg, steps=params["lm_on_policy"]["steps"], lm=replace(cfg.lm, init=str(d / "sft-teacher-data")))
        distill.run(cfg, d / "sel", out, data_cfg=data, teachers=live, progress=False)
        names[f"{method} (teacher data)" if method == "sft" else method] = out
    return lm_accuracies(params, names, TASK, d / "ev", data)


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "params.yaml")).read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    methods = _students()
    t0 = time.perf_counter()
    acc: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, a in _one_seed(params, seed, Path(tmp) / f"s{seed}", methods).items():
                acc.setdefault(name, []).append(a)
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    pairs = {"teacher_beats_gold_student": ("teacher", "sft-gold"),
             "sft_teacher_data_beats_gold": ("sft (teacher data)", "sft-gold"),
             "kd_beats_gold_student": ("kd", "sft-gold"),
             "kd_beats_sft_teacher_data": ("kd", "sft (teacher data)"),
             "teacher_beats_kd": ("teacher", "kd")}  # fmt: skip
    claims = {
        name: {"holds": mean[a] > mean[b], **paired(acc[a], acc[b])} for name, (a, b) in pairs.items() if a in acc and b in acc
    }
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "lm_students.md").write_text(accuracy_table(acc, len(seeds)))
    summary = {"seeds": len(seeds), "task": TASK, "data": params["data"], "accuracy": acc, "mean": mean, **claims,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (results / "lm_students.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_students", **summary)
    return 0
