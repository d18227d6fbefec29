"""Reward-aware LM methods against on-policy KD at the same rollout budget, over seeds, in one
process (issue 20's first claim: ``rlad`` >= ``grpo`` and >= on-policy KD).

The task is the default pipeline's ``chain_sum`` with params.yaml's ``data``, ``lm_teacher`` and
``lm_student`` sections; the other settings are in ``bench/lm_reward.yaml``. Per seed: the
teacher; a student of ``lm_student``'s size trained with ``sft`` on gold answers only (the start,
well below the teacher); then from that start, for the same steps and 32 student rollouts per
step each: ``grpo`` (no teacher), ``rlad`` (the live teacher in the ratio's anchor), ``srpo``
and ``sdpo`` (self-distillation toward the model reading a correct sibling: routed, and alone)
``sd-zero`` (self-revision, then the frozen reviser distilled) against ``rft`` (rejection
fine-tuning: the start's own samples on the train questions, the correct ones, ``sft``) and
``on-policy`` (GKD, every batch on the student's own samples, the live teacher's JSD). The
rollouts' mean reward in the first and last tenth of training tells a late collapse. Test
accuracy by the task's scorer; the claims state the mean over seeds and whether the paired
interval excludes zero (``bench.harness.paired``).

    python -m bench lm_reward                   # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_reward
    BENCH_WORKDIR=/tmp/reward python -m bench lm_reward   # keep the models; a rerun redoes what changed
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.harness import accuracy_table, cached, emit, lm_accuracies, paired, workdir
from stages import distill
from stages.config import DataConfig, DistillConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"
METHODS = ("grpo", "rlad", "srpo", "sdpo", "sd-zero", "on-policy")
SECTION = {"on-policy": "on_policy", "sd-zero": "sd_zero"}


def _one_seed(params: dict, bench: dict, seed: int, d: Path, rollouts: dict) -> dict[str, float]:
    data = load_section(DataConfig, params, "data")
    teacher = replace(load_section(DistillConfig, params, "lm_teacher"), seed=seed)
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, TASK, d / "teacher", data_cfg=data, progress=False))
    student = load_section(DistillConfig, params, "lm_student")
    start = replace(student, method="sft", seed=seed, steps=bench["start"]["steps"])
    cached(d / "gold", (teacher, start), lambda: distill.run(start, TASK, d / "gold", data_cfg=data, progress=False))
    names = {"teacher": d / "teacher", "sft-gold (start)": d / "gold"}
    for method in METHODS:
        cfg = load_section(DistillConfig, params, "lm_student", bench[SECTION.get(method, "reward")])
        cfg = replace(cfg, method=method, seed=seed, lm=replace(cfg.lm, init=str(d / "gold")))
        live = [d / "teacher"] if method in ("rlad", "on-policy") else []
        out = d / method
        cached(out, (teacher, start, cfg), lambda cfg=cfg, out=out, live=live: distill.run(
            cfg, TASK, out, data_cfg=data, teachers=live, progress=False))  # fmt: skip
        names[method] = out
        trained = json.loads((out / "training.json").read_text())
        for key in ("rollout_reward_first", "rollout_reward_last", "self_distilled_share", "srt_traces"):
            if key in trained:
                rollouts.setdefault(method, {}).setdefault(key, []).append(trained[key])
    names["rft"] = _rft(params, bench["rft"], seed, d, data, (teacher, start))
    return lm_accuracies(params, names, TASK, d / "ev", data)


def _rft(params: dict, rft: dict, seed: int, d: Path, data, upstream) -> Path:
    """Rejection fine-tuning from the start: its own samples on the train questions, the ones the
    verifier marks correct, then ``sft`` on them (sd-zero's baseline on the same questions)."""
    from stages import generate_teacher_data, select
    from stages.config import GenerateTeacherDataConfig, SelectConfig

    gen = replace(load_section(GenerateTeacherDataConfig, {"x": rft["generate"]}, "x"), seed=seed)
    cached(d / "rft-samples", (upstream, gen), lambda: generate_teacher_data.run(gen, d / "gold", TASK, d / "rft-samples",
                                                                                 data_cfg=data, progress=False))  # fmt: skip
    sel = load_section(SelectConfig, {"x": rft["select"]}, "x")
    cached(d / "rft-correct", (upstream, gen, sel), lambda: select.run(sel, d / "rft-samples", d / "rft-correct", progress=False))
    cfg = load_section(DistillConfig, params, "lm_student", rft["student"])
    cfg = replace(cfg, method="sft", seed=seed, lm=replace(cfg.lm, init=str(d / "gold")))
    cached(d / "rft", (upstream, gen, sel, cfg), lambda: distill.run(cfg, d / "rft-correct", d / "rft", data_cfg=data, progress=False))
    return d / "rft"


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    bench = yaml.safe_load((ROOT / "bench" / "lm_reward.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    t0 = time.perf_counter()
    acc: dict[str, list[float]] = {}
    rollouts: dict[str, dict[str, list[float]]] = {}
    with workdir() as d:
        for seed in seeds:
            for name, a in _one_seed(params, bench, seed, d / f"s{seed}", rollouts).items():
                acc.setdefault(name, []).append(a)
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    pairs = {"rlad_vs_grpo": ("rlad", "grpo"), "rlad_vs_on_policy": ("rlad", "on-policy"),
             "grpo_vs_start": ("grpo", "sft-gold (start)"), "rlad_vs_start": ("rlad", "sft-gold (start)"),
             "teacher_vs_start": ("teacher", "sft-gold (start)"), "sd_zero_vs_rft": ("sd-zero", "rft")}  # fmt: skip
    claims = {name: {"holds": mean[a] >= mean[b], **paired(acc[a], acc[b])} for name, (a, b) in pairs.items()}
    for method in ("srpo", "sdpo"):  # a late collapse: the rollouts' reward in the last tenth of training under the first
        r = rollouts.get(method, {})
        if r:
            claims[f"{method}_late_collapse"] = {"collapsed": statistics.fmean(r["rollout_reward_last"]) < statistics.fmean(r["rollout_reward_first"]),
                                                 **paired(r["rollout_reward_last"], r["rollout_reward_first"])}  # fmt: skip
    results = ROOT / "bench" / "results"
    (results / "lm_reward.md").write_text(accuracy_table(acc, len(seeds)))
    summary = {"seeds": len(seeds), "task": TASK, "settings": bench, "accuracy": acc, "mean": mean, "rollouts": rollouts, **claims,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (results / "lm_reward.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_reward", **summary)
    return 0
