"""Multi-gate experts on digits (issue 22): gated multi-task students against a shared-bottom
student of the same parameter count, jointly and with the tasks in sequence.

Per seed: the digits teacher (the ``teacher`` section, ``ce``); ``multi-gate`` students of each
gated kind (home, gmope, flexmore; ``EXPERT_WIDTH``-unit experts) and, for each, a
``shared-bottom`` student whose width gives about the same parameter count, all trained on the
four tasks (label, parity, high, round) with KD from the teacher and tested by ``distil
evaluate`` (each task's test accuracy, the gates' expert utilisation). Then the tasks in
sequence (``mt_sequential``): HoME with top-1 routing against its matched shared-bottom, by the
forgetting of the earlier tasks (dev split, training.json) and the final test accuracies.

    python -m bench multi_gate            # 3 seeds
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml

from bench.classifier_features import digits_metrics
from bench.harness import cached, paired, workdir, write_results
from stages import distill
from stages.classifier.models import param_count
from stages.classifier.multitask import GatedMultiTask
from stages.config import DataConfig, DistillConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("home", "gmope", "flexmore")
EXPERT_WIDTH = 32


def _params(cfg: DistillConfig, width: int) -> int:
    return param_count(GatedMultiTask(cfg.mt_kind, list(cfg.mt_tasks), 64, width, 10, experts=cfg.mt_experts,
                                      task_experts=cfg.mt_task_experts, ranks=list(cfg.mt_ranks)))  # fmt: skip


def matched(cfg: DistillConfig) -> DistillConfig:
    """The shared-bottom student whose parameter count is closest to ``cfg``'s."""
    target = _params(cfg, cfg.model.width)
    dense = replace(cfg, mt_kind="shared-bottom")
    width = min(range(8, 2048), key=lambda w: abs(_params(dense, w) - target))
    return replace(dense, model=replace(cfg.model, width=width))


def _task_mean(m: dict, tasks: list[str]) -> float:
    return statistics.fmean(m[f"task_{t}_accuracy"] for t in tasks)


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, params, "data")
    teacher_cfg = replace(load_section(DistillConfig, params, "teacher"), method="ce")
    base = load_section(DistillConfig, params, "distill")
    base = replace(base, method="multi-gate", model=replace(base.model, width=EXPERT_WIDTH))
    tasks = list(base.mt_tasks)
    joint: dict[str, list[float]] = {}
    per_task: dict[str, dict[str, list[float]]] = {}
    sizes, utilisation, seq = {}, {}, {"home (top-1)": {"forgetting": [], "final": []}, "shared-bottom": {"forgetting": [], "final": []}}
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            t_cfg = replace(teacher_cfg, seed=seed)
            cached(d / "teacher", (t_cfg, data), lambda c=t_cfg, o=d / "teacher": distill.run(c, "digits", o, data_cfg=data, progress=False))
            runs = {}
            for kind in KINDS:
                cfg = replace(base, mt_kind=kind, seed=seed)
                runs[kind], runs[f"shared-bottom ~ {kind}"] = cfg, matched(cfg)
            home_seq = replace(base, mt_kind="home", mt_top_k=1, mt_sequential=True, seed=seed)
            runs["seq home (top-1)"], runs["seq shared-bottom"] = home_seq, matched(home_seq)
            for name, cfg in runs.items():
                out = d / name.replace(" ", "_").replace("~", "vs").replace("(", "").replace(")", "")
                cached(out, (cfg, data), lambda c=cfg, o=out, t=d / "teacher": distill.run(c, "digits", o, data_cfg=data, teachers=[t], progress=False))
                m = digits_metrics(out, d / f"ev-{out.name}", data)
                sizes[name] = m["params"]
                if name.startswith("seq "):
                    s = json.loads((out / "training.json").read_text())
                    seq[name[4:]]["forgetting"].append(s["mean_forgetting"])
                    seq[name[4:]]["final"].append(_task_mean(m, tasks))
                    continue
                joint.setdefault(name, []).append(_task_mean(m, tasks))
                for t in tasks:
                    per_task.setdefault(name, {}).setdefault(t, []).append(m[f"task_{t}_accuracy"])
                if "expert_utilisation" in m:
                    utilisation.setdefault(name, []).append(m["expert_utilisation"])
    claims = {kind: paired(joint[kind], joint[f"shared-bottom ~ {kind}"]) for kind in KINDS}
    forget = paired(seq["home (top-1)"]["forgetting"], seq["shared-bottom"]["forgetting"])
    final = paired(seq["home (top-1)"]["final"], seq["shared-bottom"]["final"])
    out = {"seeds": len(seeds), "tasks": tasks, "params": sizes, "joint_mean_task_accuracy": joint, "per_task": per_task,
           "utilisation": utilisation, "gated_minus_shared_bottom": claims, "sequential": seq,
           "sequential_forgetting_home_minus_shared": forget, "sequential_final_home_minus_shared": final,
           "seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"### Multi-gate experts on digits: tasks {', '.join(tasks)} ({len(seeds)} seeds, test split)", "",
             "| student | params | mean task accuracy | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]  # fmt: skip
    for name, xs in joint.items():
        cells = " | ".join(f"{statistics.fmean(per_task[name][t]):.4f}" for t in tasks)
        lines.append(f"| {name} | {sizes[name]:,} | {statistics.fmean(xs):.4f} | {cells} |")
    lines += ["", "| tasks in sequence | params | mean forgetting (dev) | final mean task accuracy |", "|---|---|---|---|"]
    for name, v in seq.items():
        lines.append(f"| {name} | {sizes['seq ' + name]:,} | {statistics.fmean(v['forgetting']):.4f} | {statistics.fmean(v['final']):.4f} |")
    write_results("multi_gate", out, lines)
    return 0
