"""Methods that shape the representation: a random teacher, rotation label augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.classifier.methods.common import Trained, build, frozen
from stages.classifier.models import Classifier
from stages.classifier.training import Context, fit
from stages.errors import DistilError
from stages.losses import cross_entropy
from stages.losses.logits import forward_kl, soft_cross_entropy


def linear_probe(ctx: Context, model: Classifier, steps: int) -> float:
    """Fit ``model.head`` on frozen trunk features of the labelled train rows (full-batch
    AdamW on standardised features, folded back into the head); return dev accuracy."""
    labeled = ctx.train["labeled"]
    x, y = ctx.train["x"][labeled], ctx.train["y"][labeled]
    with torch.no_grad():
        feats = ctx.logits(model, x, lambda m, xb: m.features(xb)).double()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = ((feats - mu) / sd).float()
    torch.manual_seed(ctx.cfg.seed)
    head = torch.nn.Linear(z.shape[1], ctx.ex.num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(z), y).backward()
        opt.step()
    with torch.no_grad():  # head(standardise(f)) == (W / sd) f + (b - W mu / sd)
        w = head.weight.double() / sd
        model.head.weight.copy_(w.float().repeat(model.experts, 1))
        model.head.bias.copy_((head.bias.double() - w @ mu).float().repeat(model.experts))
    dev_pred = ctx.logits(model, ctx.dev["x"]).argmax(1)
    return float((dev_pred == ctx.dev["y"]).double().mean())


TEACHER_TEMPERATURE, STUDENT_TEMPERATURE = 0.04, 0.1
"""DINO's defaults (Caron et al. 2021), which Random Teachers keeps: the teacher's output is
sharpened more than the student's."""


def random_teacher(ctx: Context) -> Trained:
    """Random Teachers are Good Teachers (Sarnthein et al., ICML 2023, section 3): a student
    distils a frozen, randomly initialised teacher of the same architecture through a
    ``probe_dim``-dimensional projection: cross-entropy between the teacher's sharpened
    softmax (temperature 0.04) and the student's (0.1), the student on augmented inputs,
    no labels (their eq. 1 without DINO's centering, which a frozen teacher does not need). A linear probe on the frozen trunk then measures the
    representation: the paper reports the student's probe beating the teacher's."""
    cfg = ctx.cfg
    teacher = frozen(build(ctx, init=1, experts=1, aux_classes=cfg.probe_dim))
    student = build(ctx, init=2, experts=1, aux_classes=cfg.probe_dim)

    def loss(m, b):
        with torch.no_grad():  # sharpened teacher targets, as DINO's (and the paper's) teacher temperature
            target = torch.softmax(teacher.aux_logits(b["x_raw"]) / TEACHER_TEMPERATURE, dim=-1)
        return soft_cross_entropy(m.aux_logits(b["x"]), target, temperature=STUDENT_TEMPERATURE, weight=b["w"])

    summary = fit(ctx, student, loss, select_best=False, predict=lambda m, x: m.aux_logits(x)[:, : ctx.ex.num_classes])
    teacher_probe = linear_probe(ctx, teacher, cfg.probe_epochs)
    student_probe = linear_probe(ctx, student, cfg.probe_epochs)
    summary.update(teacher_probe_dev_accuracy=teacher_probe, student_probe_dev_accuracy=student_probe)
    return Trained(student, summary, {"random_teacher": teacher})


def _rotate(x: torch.Tensor, shape: list[int], r: int) -> torch.Tensor:
    return torch.rot90(x.reshape(-1, *shape), r, dims=(2, 3)).reshape(x.shape)


def sla_sd(ctx: Context) -> Trained:
    """Self-supervised label augmentation with self-distillation (Lee et al., ICML 2020):
    a joint head over (class, rotation) labels is trained on all M rotations of each
    input (eq. 4, L_SLA); the aggregated prediction ``softmax(mean_r z_joint(rot_r x)[c, r])``
    (eq. 6) teaches the ordinary head in a single un-rotated pass (eq. 7, L_SLA+SD). The
    saved model predicts with the single-pass head."""
    cfg, shape, c = ctx.cfg, ctx.ex.input_shape, ctx.ex.num_classes
    m_rot = cfg.rotations
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DistilError(f"sla-sd rotates square images, but the inputs have shape {shape}; use another method")
    if m_rot < 2 or m_rot > 4:
        raise DistilError(f"sla-sd: rotations must be 2, 3 or 4, got {m_rot}")

    def aggregated(m, x):
        joint = torch.stack([m.aux_logits(_rotate(x, shape, r)).view(-1, c, m_rot)[:, :, r] for r in range(m_rot)])
        return joint.mean(0)

    def loss(m, b):
        x, y, n = b["x"], b["y"], len(b["y"])
        rotated = torch.cat([_rotate(x, shape, r) for r in range(m_rot)])
        joint_logits = m.aux_logits(rotated)
        joint_y = torch.cat([y * m_rot + r for r in range(m_rot)])
        sla = cross_entropy(joint_logits, joint_y, weight=b["w"].repeat(m_rot))
        agg = joint_logits.view(m_rot, n, c, m_rot).diagonal(dim1=0, dim2=3).mean(-1)  # [n, c]: z(rot_r x)[c, r] averaged
        sd = forward_kl(m(x), agg.detach(), temperature=cfg.temperature, weight=b["w"])
        return sla + sd

    model = build(ctx, experts=1, aux_classes=c * m_rot)
    summary = fit(ctx, model, loss)
    agg_pred = ctx.logits(model, ctx.dev["x"], aggregated).argmax(1)
    summary["aggregated_dev_accuracy"] = float((agg_pred == ctx.dev["y"]).double().mean())
    return Trained(model, summary)
