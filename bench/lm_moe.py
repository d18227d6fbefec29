"""Mixture-of-experts teachers and specialised teachers on a two-task reasoning mixture,
over seeds, in one process: the accuracy claims of the MoE issue, with the settings of
``bench/lm_moe.yaml``.

Per seed, on the mixture of the settings' ``tasks`` (the students have gold answers for part
of the train prompts; with ``teacher_gold: all`` the teachers have them for every train prompt):

- teachers trained with ``sft`` on gold: an MoE teacher (Mixtral classes, 8 experts of
  width w, 2 per token) and a dense teacher with the same active parameters (one MLP of
  width 2w), which is also the generalist; two specialists of that same size, one per task;
- teacher data (samples with top-k log-probs, MoE routing) on every train prompt, the
  label-free ``select`` of the settings;
- dense students of one smaller size and one step budget: ``sft`` on gold only, ``kd`` from
  the MoE teacher (its top-k log-probs), ``sft`` on the MoE teacher's selected samples
  (sequence-level distillation), ``kd`` from the generalist, ``mst`` from the two
  specialists with the label-free ``confidence`` gate and with the ``task`` gate; with
  ``teacher_gold: all``, a reference: ``sft`` on the teachers' gold;
- test accuracy by each task's scorer; the MoE teacher's routing metrics; its accuracy
  with ``--decode scmoe`` against greedy decoding.

Writes ``bench/results/lm_moe.{md,json}`` and prints one JSON line.

    python -m bench lm_moe                     # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_moe
    BENCH_PARAMS=other.yaml python -m bench lm_moe
    BENCH_WORKDIR=/tmp/moe python -m bench lm_moe   # keep the models; a rerun redoes what changed
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

from bench.harness import cached, emit, workdir
from stages import distill, evaluate, generate_teacher_data, select
from stages.config import DataConfig, DistillConfig, EvaluateConfig, GenerateTeacherDataConfig, SelectConfig, load_section
from stages.lm.models import active_parameters, load_lm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = ("chain_sum", "basic_arithmetic")
ROUTING = ("routing_load_entropy", "routing_top1_repeat", "routing_srp", "routing_sch")


def teacher_data_config(params: dict, data: DataConfig) -> DataConfig:
    """The split the teachers train on. ``teacher_gold: all``: the same prompts as the
    students' ``data``, with the gold answers of the ``unlabeled`` prompts as well, so a
    teacher knows more than the students' gold shows (a student sees those prompts only
    through the teacher's outputs); ``student``: the students' gold only."""
    gold = params.get("teacher_gold", "student")
    if gold == "student":
        return data
    if gold != "all":
        raise ValueError(f"teacher_gold must be 'all' or 'student', got {gold!r}")
    return replace(data, sizes=[data.sizes[0] + data.unlabeled, *data.sizes[1:]], unlabeled=0)


def _teachers(params: dict, seed: int, d: Path, data: DataConfig, tasks: tuple[str, ...]) -> dict[str, object]:
    """Train the teachers and make their teacher data; returns the settings each output
    depends on (the keys of ``cached`` steps)."""
    mix = "+".join(tasks)
    data, student_data = teacher_data_config(params, data), data
    dense = replace(load_section(DistillConfig, params, "dense_teacher"), seed=seed)
    cached(d / "dense", (dense, data, mix), lambda: distill.run(dense, mix, d / "dense", data_cfg=data, progress=False))
    shared = replace(dense.lm, tokenizer=str(d / "dense"))  # one vocabulary: top-k ids comparable across teachers
    moe = replace(load_section(DistillConfig, params, "moe_teacher"), seed=seed)
    moe = replace(moe, lm=replace(moe.lm, tokenizer=str(d / "dense")))
    cached(d / "moe", (dense, moe, data, mix), lambda: distill.run(moe, mix, d / "moe", data_cfg=data, progress=False))
    for task in tasks:
        spec = replace(dense, lm=shared)
        cached(d / f"spec-{task}", (dense, data, task),
               lambda spec=spec, task=task: distill.run(spec, task, d / f"spec-{task}", data_cfg=data, progress=False))  # fmt: skip
    gen = replace(load_section(GenerateTeacherDataConfig, params, "generate"), seed=seed)
    sel = load_section(SelectConfig, params, "select")
    keys = {}
    for name, teachers in {"moe": [d / "moe"], "dense": [d / "dense"], "spec": [d / f"spec-{t}" for t in tasks]}.items():
        trained = (dense, moe) if name == "moe" else (dense,)  # the MoE shares the dense teacher's tokenizer
        keys[name] = (*trained, data, student_data, mix, gen, sel)
        cached(d / f"td-{name}", keys[name][:-1],
               lambda t=teachers, name=name: generate_teacher_data.run(gen, t, mix, d / f"td-{name}", data_cfg=student_data, progress=False))  # fmt: skip
        cached(
            d / f"sel-{name}", keys[name], lambda name=name: select.run(sel, d / f"td-{name}", d / f"sel-{name}", progress=False)
        )
    return keys


def _students(params: dict, seed: int, d: Path, data: DataConfig, tasks: tuple[str, ...], keys: dict) -> dict[str, Path]:
    mix = "+".join(tasks)
    base = replace(load_section(DistillConfig, params, "student"), seed=seed)
    student = replace(base, lm=replace(base.lm, tokenizer=str(d / "dense")))
    runs = {
        "student: sft on gold": (replace(student, method="sft"), mix, None),
        "student: kd from MoE teacher": (replace(student, method="kd"), d / "sel-moe", "moe"),
        "student: kd from dense generalist": (replace(student, method="kd"), d / "sel-dense", "dense"),
        "student: mst, specialists, confidence gate": (replace(student, method="mst", gate="confidence"), d / "sel-spec", "spec"),
        "student: mst, specialists, task gate": (replace(student, method="mst", gate="task"), d / "sel-spec", "spec"),
        "student: sft on MoE teacher samples": (replace(student, method="sft"), d / "sel-moe", "moe"),
    }
    if teacher_data_config(params, data) != data:  # a reference: the student with the teachers' gold
        runs["student: sft on the teachers' gold (reference)"] = (replace(student, method="sft"), mix, None)
    out = {}
    for i, (name, (cfg, source, teacher)) in enumerate(runs.items()):
        split = teacher_data_config(params, data) if "teachers' gold" in name else data
        key = (cfg, split, mix, keys.get(teacher) if teacher else None)
        out[name] = cached(d / f"student-{i}", key,
                           lambda cfg=cfg, source=source, i=i, split=split: distill.run(cfg, source, d / f"student-{i}", data_cfg=split, progress=False))  # fmt: skip
    return out


def _one_seed(params: dict, seed: int, d: Path, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    mix = "+".join(tasks)
    data = load_section(DataConfig, params, "data")
    keys = _teachers(params, seed, d, data, tasks)
    models = {"MoE teacher": d / "moe", "dense teacher (same active params)": d / "dense",
              **{f"specialist: {t}": d / f"spec-{t}" for t in tasks}, **_students(params, seed, d, data, tasks, keys)}  # fmt: skip
    cfg = load_section(EvaluateConfig, params, "evaluate")
    for stale in ("ev", "ev-scmoe"):  # evaluations are redone on every run
        shutil.rmtree(d / stale, ignore_errors=True)
    quiet = Console(file=io.StringIO())
    metrics = json.loads(
        (evaluate.run(cfg, list(models.values()), mix, d / "ev", data_cfg=data, console=quiet) / "metrics.json").read_text()
    )
    scmoe = evaluate.run(replace(cfg, decode="scmoe"), [d / "moe"], mix, d / "ev-scmoe", data_cfg=data, console=quiet)
    sc = json.loads((scmoe / "metrics.json").read_text())["moe"]
    rows = {}
    for name, path in models.items():
        m = metrics[path.name]
        model, _ = load_lm(path)
        rows[name] = {"accuracy": m["accuracy"], **{t: m.get(f"accuracy_{t}", float("nan")) for t in tasks},
                      "active_params": active_parameters(model), "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    rows["MoE teacher"].update({k: metrics["moe"][k] for k in ROUTING})
    rows["MoE teacher, SCMoE decoding"] = {
        "accuracy": sc["accuracy"],
        **{t: sc.get(f"accuracy_{t}", float("nan")) for t in tasks},
    }
    return rows


def _table(acc: dict[str, dict[str, list[float]]], seeds: int, tasks: tuple[str, ...]) -> str:
    def cell(xs: list[float]) -> str:
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.fmean(xs):.3f} ± {std:.3f}"

    lines = [f"| model (mean ± std over {seeds} seeds) | accuracy | {' | '.join(tasks)} | active / total params |",
             "|---|---|" + "---|" * len(tasks) + "---|"]  # fmt: skip
    for name, cols in acc.items():
        params = f"{int(cols['active_params'][0]):,} / {int(cols['params'][0]):,}" if "params" in cols else ""
        lines.append(f"| {name} | {cell(cols['accuracy'])} | {' | '.join(cell(cols[t]) for t in tasks)} | {params} |")
    routing = acc["MoE teacher"]
    lines += ["", "| MoE teacher routing (test prompts + greedy completions) | mean over seeds |", "|---|---|"]
    lines += [f"| {k.removeprefix('routing_')} | {statistics.fmean(routing[k]):.3f} |" for k in ROUTING]
    return "\n".join(lines) + "\n"


def _write(acc: dict[str, dict[str, list[float]]], seeds: int, seconds: float, tasks: tuple[str, ...]) -> dict:
    """Write the table and the summary of the seeds done so far (a long run keeps its
    finished seeds if it is stopped)."""
    mean = {name: statistics.fmean(cols["accuracy"]) for name, cols in acc.items()}
    gold = mean["student: sft on gold"]
    summary = {
        "seeds": seeds, "data": "+".join(tasks), "accuracy": {n: c["accuracy"] for n, c in acc.items()}, "mean": mean,
        "moe_teacher_beats_dense_same_active": mean["MoE teacher"] > mean["dense teacher (same active params)"],
        "moe_kd_student_beats_gold_student": mean["student: kd from MoE teacher"] > gold,
        "moe_samples_student_beats_gold_student": mean["student: sft on MoE teacher samples"] > gold,
        **{f"specialists_{gate}_gate_beat_generalist_source": (
            mean[f"student: mst, specialists, {gate} gate"] > mean["student: kd from dense generalist"]
        ) for gate in ("task", "confidence")},
        "scmoe_minus_greedy_points": 100 * (mean["MoE teacher, SCMoE decoding"] - mean["MoE teacher"]),
        "routing": {k: statistics.fmean(acc["MoE teacher"][k]) for k in ROUTING},
        "seconds": seconds,
    }  # fmt: skip
    reference = mean.get("student: sft on the teachers' gold (reference)")
    if reference is not None and reference != gold:  # the share of the extra gold's gain that distillation recovers
        summary["moe_kd_student_share_of_extra_gold_gain"] = (mean["student: kd from MoE teacher"] - gold) / (reference - gold)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "lm_moe.md").write_text(_table(acc, seeds, tasks))
    (results / "lm_moe.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "bench" / "lm_moe.yaml")).read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    tasks = tuple(params.get("tasks", DEFAULT_TASKS))
    t0 = time.perf_counter()
    acc: dict[str, dict[str, list[float]]] = {}
    with workdir() as tmp:
        for seed in seeds:
            for name, cols in _one_seed(params, seed, tmp / f"s{seed}", tasks).items():
                for col, v in cols.items():
                    acc.setdefault(name, {}).setdefault(col, []).append(float(v))
            summary = _write(acc, seed + 1, time.perf_counter() - t0, tasks)
    emit("lm_moe", **summary)
    return 0
