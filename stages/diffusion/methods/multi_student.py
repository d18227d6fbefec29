"""``distill --method multi-student``: several one-step students of a class-conditional teacher,
each for a group of its classes, routed by class.

Multi-student Diffusion Distillation (Song et al., "Multi-student Diffusion Distillation for
Better One-step Generators", 2024): a teacher's conditions are split between several students,
each distilled on its own share, so each can be smaller than one student serving them all at
the same quality, or better at the same size. Here the K classes are cut into
``diffusion.students`` contiguous groups; student i is ``consistency-distill`` of the teacher
on the train rows of its classes only (class-conditional, each row's teacher step of its own
class; ``stages.diffusion.methods.consistency``), started from the teacher (``student_init:
teacher``) or fresh at the student's own size (``student_init: fresh`` with
``diffusion.width`` / ``channels``: smaller students). The saved model is a ``ClassExperts``
holding every student and the class -> student routing, sampled as a 1-4 step consistency
model; MSD's DMD objective is replaced by consistency distillation. Each student trains in its
own work directory, so a killed run resumes at the student it was on.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.generator import load_generator
from stages.diffusion.methods import consistency
from stages.diffusion.models import ClassExperts
from stages.errors import DistilError


def class_groups(classes: int, students: int) -> list[list[int]]:
    """The classes 0..classes-1 cut into ``students`` contiguous groups of near-equal size."""
    if not 2 <= students <= classes:
        raise DistilError(f"diffusion.students must be between 2 and the teacher's {classes} classes, got {students}")
    return [list(map(int, part)) for part in np.array_split(np.arange(classes), students)]


def subset(data: GeneratorData, group: list[int]) -> GeneratorData:
    """The rows of ``data`` whose class is in ``group``, every split."""
    keep = {s: np.isin(y, group) for s, y in data.labels.items()}
    return dataclasses.replace(data, splits={s: x[keep[s]] if s in keep else x for s, x in data.splits.items()},
                               labels={s: y[keep[s]] for s, y in data.labels.items()})  # fmt: skip


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(the students as one ``ClassExperts``, the first student's LCMScheduler, summary)."""
    teacher = load_generator(teacher_path, device, "teacher") if teacher_path else None
    if teacher is None or not teacher.classes:
        raise DistilError(f"multi-student splits a class-conditional teacher's classes; {teacher_path} is not one "
                          "(train it with --method denoise --set diffusion.classes=K)")  # fmt: skip
    groups = class_groups(teacher.classes, cfg.diffusion.students)
    experts, rows, scheduler = [], [], None
    for i, group in enumerate(groups):
        share = subset(data, group)
        if not len(share.splits.get("train", ())):
            raise DistilError(f"no train rows of classes {group} in {data.name}; check data.limit")
        model, sched, summary = consistency.train(cfg, share, teacher_path, work / f"student-{i}", device=device, bar=bar,
                                                  live=live, method=f"multi-student {i + 1}/{len(groups)}")  # fmt: skip
        experts.append(model)
        scheduler = scheduler or sched
        rows.append({"classes": group, "train_rows": len(share.splits["train"]), "epochs": summary["epochs"],
                     "train_seconds": summary["train_seconds"], "paired_error_final": summary["paired_error_final"]})  # fmt: skip
    combined = ClassExperts.of(experts, groups, teacher.classes)
    for i in range(len(groups)):  # the students' resume scratch: the finished model holds them all
        shutil.rmtree(work / f"student-{i}", ignore_errors=True)
    summary = {"teacher": teacher.identity(), "students": rows, "groups": groups,
               "params_per_student": sum(p.numel() for p in experts[0].parameters()),
               "train_seconds": sum(r["train_seconds"] for r in rows)}  # fmt: skip
    return combined, scheduler, summary
