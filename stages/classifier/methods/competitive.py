"""``distill --method competitive``: rounds in which student and teacher learn from each other's
hard examples.

CoMD (Li et al. 2023, "Unlock the Power: Competitive Distillation for Multi-Modal Large Language
Models", section 3.2, the competitive distillation stage): instead of one pass of teacher ->
student transfer, training runs in rounds with feedback both ways. Each round here:

1. **the student's hard examples** (CoMD's instructions the student answers worse than the teacher):
   the ``hard_share`` of train rows with the largest KL(teacher || student) under the current
   student get weight 2 (the rest 1) in this round's KD + CE training of the student (warm-started
   from the previous round; ``epochs / competitive_rounds`` epochs);
2. **the teacher's hard examples** (where the student answers better): train rows the teacher
   gets wrong and the student right. The teacher (a copy; the input teacher is not touched) is
   fine-tuned with CE on every row, those hard rows counted twice, plus KD from the student on
   the hard rows alone (the student's feedback), at a tenth of the learning rate and for a
   quarter of the student's epochs, so the feedback corrects it without retraining it; the next
   round's student learns from this updated teacher. (A first version fine-tuned on the hard rows
   and as many easy ones only: a teacher with one hard row overfitted two rows and fell to 0.2
   dev accuracy, and its student with it, in three of five bench seeds.)

CoMD's LLM judge and its generation of new instructions like the hard ones have no counterpart
for a fixed labelled table; the exchange of hard examples between the two models is the part
kept. Per round, training.json records both models' dev accuracy and how many hard rows each had;
the final teacher is saved beside the student (``teacher/``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from stages.classifier.methods.common import Trained, build
from stages.classifier.training import Context, fit
from stages.config import ModelConfig
from stages.losses import cross_entropy
from stages.losses.logits import forward_kl


def _per_row_kl(ctx: Context, teacher, student) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature 1 per train row (un-augmented inputs)."""
    t = torch.log_softmax(ctx.logits(teacher, ctx.train["x"]), -1)
    s = torch.log_softmax(ctx.logits(student, ctx.train["x"]), -1)
    return (t.exp() * (t - s)).sum(-1)


def _dev_accuracy(ctx: Context, model) -> float:
    return float((ctx.logits(model, ctx.dev["x"]).argmax(1) == ctx.dev["y"]).double().mean())


def _weighted_kd(source, rows: torch.Tensor, alpha: float, temperature: float):
    """(1 - alpha) CE + alpha T^2 KL(source || model), each train row weighted by ``rows[idx]``."""

    def loss(m, b):
        z = m(b["x"])
        w = b["w"] * rows[b["idx"]].to(z.device)
        with torch.no_grad():
            target = source(b["x"]).float()
        return (1 - alpha) * cross_entropy(z, b["y"], weight=w) + alpha * forward_kl(z, target, temperature=temperature, weight=w)

    return loss


TEACHER_LR_SHARE = 0.1
"""The teacher is fine-tuned at this share of the student's learning rate: feedback, not retraining."""


def _teacher_feedback(student, hard_rows: torch.Tensor, temperature: float):
    """The teacher's loss: CE on every row (its hard rows, where only the student is right, counted
    twice) plus T^2 KL(student || teacher) on those hard rows alone: gold anchors it everywhere, the
    student's feedback acts where the student knows better."""

    def loss(m, b):
        z = m(b["x"])
        hard = hard_rows[b["idx"]].to(z.device)
        with torch.no_grad():
            target = student(b["x"]).float()
        ce = cross_entropy(z, b["y"], weight=b["w"] * (1 + hard))
        return ce + forward_kl(z, target, temperature=temperature, weight=b["w"] * hard)

    return loss


def competitive(ctx: Context) -> Trained:
    cfg = ctx.cfg
    teacher = copy.deepcopy(ctx.teachers[0]).to(ctx.device)
    student = build(ctx)
    rounds = cfg.competitive_rounds
    student_epochs, teacher_epochs = max(1, cfg.epochs // rounds), max(1, cfg.epochs // (4 * rounds))
    n = len(ctx.train["y"])
    history, last = [], {}
    for r in range(1, rounds + 1):
        weight = torch.ones(n)
        kl = _per_row_kl(ctx, teacher, student)
        hard = kl.topk(max(1, round(cfg.hard_share * n))).indices
        weight[hard] = 2.0
        frozen_teacher = copy.deepcopy(teacher).eval().requires_grad_(False)

        student_loss = _weighted_kd(frozen_teacher, weight, cfg.alpha, cfg.temperature)
        last = fit(ctx, student, student_loss, tag=f"student{r}", epochs=student_epochs)
        with torch.no_grad():
            t_pred = ctx.logits(teacher, ctx.train["x"]).argmax(1)
            s_pred = ctx.logits(student, ctx.train["x"]).argmax(1)
        y = ctx.train["y"]
        teacher_hard = ((t_pred != y) & (s_pred == y)).nonzero().flatten()
        if len(teacher_hard):
            hard_rows = torch.zeros(n)
            hard_rows[teacher_hard] = 1.0
            teacher_loss = _teacher_feedback(copy.deepcopy(student).eval().requires_grad_(False), hard_rows, cfg.temperature)
            teacher.requires_grad_(True)
            gentle = replace(ctx, cfg=replace(cfg, lr=cfg.lr * TEACHER_LR_SHARE))
            fit(gentle, teacher, teacher_loss, tag=f"teacher{r}", epochs=teacher_epochs, select_best=False)
            teacher.requires_grad_(False)
        history.append({"round": r, "student_hard_rows": len(hard), "teacher_hard_rows": int(len(teacher_hard)),
                        "student_dev_accuracy": _dev_accuracy(ctx, student), "teacher_dev_accuracy": _dev_accuracy(ctx, teacher)})  # fmt: skip
    summary = {**last, "rounds": history, "teacher_dev_accuracy_start": _dev_accuracy(ctx, ctx.teachers[0])}
    c = ctx.teacher_configs[0]
    own = ModelConfig(arch=c["arch"], width=c["width"], depth=c["depth"], dropout=c.get("dropout", 0.0))
    return Trained(student, summary, {"teacher": teacher}, extra_cfgs={"teacher": own})
