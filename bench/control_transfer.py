"""Control transfer (issue 21): how much of a LoRA's control, fitted on a diffusion teacher, does a
distilled student keep when the same adapter is merged into it unchanged?

Per seed and class: an unconditional MLP teacher on 8x8 digits (``denoise``), its
``consistency-distill`` student, and a ``control-lora`` adapter fitted to the teacher on the train
images of one class. ``distil evaluate --set control=ADAPTER`` samples every model with and without
the adapter merged and reports ``control_share``, the share of samples the stage's digits
classifier calls that class: the teacher at 20 steps, the student at 1 and 2. The transfer is the
student's gain in share over the teacher's gain (1: all the control survives distillation).

    python -m bench control_transfer            # 3 seeds x classes 3 and 7
    BENCH_SEEDS=1 python -m bench control_transfer
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace

from bench.harness import cached, paired, workdir, write_results
from stages import distill, evaluate
from stages.config import DataConfig, DiffusionConfig, DistillConfig, EvaluateConfig

DIGITS = "digits-images"
MLP = {"arch": "mlp", "width": 128, "depth": 2, "checkpoint_every": 250}
TEACHER = DistillConfig(method="denoise", diffusion=DiffusionConfig(**MLP, prediction="v_prediction"), steps=1500,
                        batch_size=128, lr=0.003)  # fmt: skip
STUDENT = DistillConfig(method="consistency-distill", diffusion=DiffusionConfig(**MLP, skip=50, solver="heun"), steps=500,
                        batch_size=128, lr=0.0005)  # fmt: skip
LORA = DistillConfig(method="control-lora", diffusion=DiffusionConfig(**MLP, control_rank=4), steps=200, batch_size=64, lr=0.003)
CLASSES = (3, 7)
ROWS = {"teacher, 20 steps": "teacher/steps_20", "student, 1 step": "student/steps_1", "student, 2 steps": "student/steps_2"}


def _shares(metrics: dict, row: str) -> tuple[float, float]:
    model, steps = row.split("/")
    return metrics[row]["control_share"], metrics[f"{model}+control/{steps}"]["control_share"]


def _ci(g: dict) -> str:
    """A paired difference as "+mean [low, high]" (no interval for one pair)."""
    lo_hi = f" [{g['interval'][0]:+.3f}, {g['interval'][1]:+.3f}]" if g["interval"] else ""
    return f"{g['mean_diff']:+.3f}{lo_hi}"


def main() -> int:
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = DataConfig()
    share: dict[str, dict[str, list[float]]] = {}  # row -> {"without": [...], "with": [...]} over seeds x classes
    transfer: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with workdir() as root:
        for seed in seeds:
            d = root / f"s{seed}"
            teacher, student = replace(TEACHER, seed=seed), replace(STUDENT, seed=seed)
            cached(d / "teacher", (teacher, data), lambda c=teacher, o=d / "teacher": distill.run(c, DIGITS, o, data_cfg=data, progress=False))
            cached(d / "student", (teacher, student, data), lambda c=student, o=d / "student", t=d / "teacher": distill.run(
                c, DIGITS, o, data_cfg=data, teachers=[t], progress=False))  # fmt: skip
            for cls in CLASSES:
                lora = replace(LORA, seed=seed, diffusion=replace(LORA.diffusion, control_class=cls))
                ctrl = d / f"control-{cls}"
                cached(ctrl, (teacher, lora, data), lambda c=lora, o=ctrl, t=d / "teacher": distill.run(
                    c, DIGITS, o, data_cfg=data, teachers=[t], progress=False))  # fmt: skip
                ev = EvaluateConfig(n_samples=500, time_samples=0, seed=seed, control=str(ctrl), step_counts=[20])
                out_t = evaluate.run(ev, [d / "teacher"], DIGITS, d / f"ev-t-{cls}", data_cfg=data)
                out_s = evaluate.run(replace(ev, step_counts=[1, 2]), [d / "student"], DIGITS, d / f"ev-s-{cls}", data_cfg=data)
                metrics = {**json.loads((out_t / "metrics.json").read_text()), **json.loads((out_s / "metrics.json").read_text())}
                gains = {}
                for name, row in ROWS.items():
                    without, with_ = _shares(metrics, row)
                    share.setdefault(name, {"without": [], "with": []})
                    share[name]["without"].append(without)
                    share[name]["with"].append(with_)
                    gains[name] = with_ - without
                for name in list(ROWS)[1:]:
                    transfer.setdefault(name, []).append(gains[name] / max(gains["teacher, 20 steps"], 1e-9))
    gain = {name: paired(v["with"], v["without"]) for name, v in share.items()}
    student_vs_teacher = {name: paired([w - o for w, o in zip(share[name]["with"], share[name]["without"], strict=True)],
                                       [w - o for w, o in zip(share["teacher, 20 steps"]["with"], share["teacher, 20 steps"]["without"], strict=True)])
                          for name in list(ROWS)[1:]}  # fmt: skip
    out = {"seeds": len(seeds), "classes": list(CLASSES), "control_share": share, "gain_with_control": gain,
           "transfer_student_gain_over_teacher_gain": {k: statistics.fmean(v) for k, v in transfer.items()},
           "student_gain_minus_teacher_gain": student_vs_teacher, "seconds": time.perf_counter() - t0}  # fmt: skip
    lines = [f"### Control transfer on 8x8 digits ({len(seeds)} seeds x classes {', '.join(map(str, CLASSES))}): share of "
             "samples of the adapter's class", "", "| model | without the adapter | with it | gain [95% CI] |", "|---|---|---|---|"]  # fmt: skip
    for name, v in share.items():
        lines.append(f"| {name} | {statistics.fmean(v['without']):.3f} | {statistics.fmean(v['with']):.3f} | {_ci(gain[name])} |")
    lines += ["", "| student | its gain over the teacher's (mean) | student gain - teacher gain [95% CI] |", "|---|---|---|"]
    for name, v in transfer.items():
        lines.append(f"| {name} | {statistics.fmean(v):.2f} | {_ci(student_vs_teacher[name])} |")
    write_results("control_transfer", out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
