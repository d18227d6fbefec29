"""Methods that distil intermediate representations of live teachers: FitNets' hint, Distiller's
MI-alpha, and Hybrid Distillation's two teachers (relations from one, features from the other).

Each student carries a linear projection of its features onto the teacher's feature space (the
``aux_head``: FitNets' regressor, MI-alpha's critic projection), trained with it and saved with it
(unused in prediction)."""

from __future__ import annotations

import torch

from stages.classifier.methods.common import Trained, build, teacher_logits
from stages.classifier.training import Context, fit
from stages.losses import DIVERGENCES, cross_entropy, divergence_hyper
from stages.losses.representation import cosine_scores, hint_mse, mi_alpha_bound, relation_kl


def feature_dim(ctx: Context, teacher: torch.nn.Module) -> int:
    with torch.no_grad():
        return int(teacher.features(ctx.train["x"][:2].to(ctx.device)).shape[-1])


def _with_kd(ctx: Context, term) -> Trained:
    """(1 - alpha) CE + alpha KD (Hinton's T^2 KL) + feature_weight * term(student, batch, teacher features)."""
    cfg, teacher = ctx.cfg, ctx.teachers[0]
    kd, hyper = DIVERGENCES["kd"], divergence_hyper("kd", cfg)
    parts = {"intermediate": []}

    def loss(m, b):
        z = m(b["x"])
        with torch.no_grad():
            t_feat = teacher.features(b["x"]).float()
        inter = term(m, b, t_feat)
        parts["intermediate"].append(float(inter.detach()))
        distil = kd(z, teacher_logits(ctx, b), weight=b["w"], **hyper)
        return (1 - cfg.alpha) * cross_entropy(z, b["y"], weight=b["w"]) + cfg.alpha * distil + cfg.feature_weight * inter

    model = build(ctx, aux_classes=feature_dim(ctx, teacher))
    summary = fit(ctx, model, loss)
    tail = parts["intermediate"][-max(1, len(parts["intermediate"]) // 10) :]
    summary["intermediate_loss_last"] = sum(tail) / max(1, len(tail))
    return Trained(model, summary)


def fitnet(ctx: Context) -> Trained:
    """FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", eq. 3): the student's
    features, through a learnt linear regressor, regress the teacher's (standardised) features,
    trained jointly with KD + CE rather than in FitNets' separate first stage: the plain feature
    MSE that ``mi-alpha`` is measured against."""
    return _with_kd(ctx, lambda m, b, t: hint_mse(m.aux_logits(b["x"]), t))


def mi_alpha(ctx: Context) -> Trained:
    """Distiller (He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in
    NLP", section 3.3): intermediate distillation as maximising the mutual information between
    the student's and the teacher's representations of the same inputs, estimated with the
    I_alpha bound (``stages.losses.representation.mi_alpha_bound``, alpha = ``mi_alpha``) on the
    cosine critic f(s_i, t_j) = cos(P s_i, t_j) / ``critic_temperature`` over the batch (P the
    student's projection head); the loss term is -I_alpha."""
    cfg = ctx.cfg
    return _with_kd(ctx, lambda m, b, t: -mi_alpha_bound(cosine_scores(m.aux_logits(b["x"]), t, cfg.critic_temperature),
                                                          cfg.mi_alpha))  # fmt: skip


def hybrid(ctx: Context) -> Trained:
    """Hybrid Distillation (Shi et al. 2023, "Hybrid Distillation: Connecting Masked Autoencoders
    with Contrastive Learners", section 3.2): one student, two teachers of different inductive
    biases. From the first (``--teacher`` A) it imitates relations, the softmax over the other rows
    of a batch of cosine similarities of A's features (the paper's token relations of the MIM
    teacher: ``relation_kl``); from the second (B) it regresses the features through its
    projection head (the paper's feature distillation of the supervised / contrastive teacher:
    ``hint_mse``). Loss (1 - alpha) CE + alpha (relations + features). The paper's progressive
    redundant-token masking has no counterpart for rows of features and is not part of it."""
    cfg = ctx.cfg
    relations_from, features_from = ctx.teachers
    seen = {"relations": [], "features": []}

    def loss(m, b):
        x = b["x"]
        with torch.no_grad():
            t_rel, t_feat = relations_from.features(x).float(), features_from.features(x).float()
        rel = relation_kl(m.features(x), t_rel, cfg.critic_temperature)
        feat = hint_mse(m.aux_logits(x), t_feat)
        seen["relations"].append(float(rel.detach()))
        seen["features"].append(float(feat.detach()))
        return (1 - cfg.alpha) * cross_entropy(m(x), b["y"], weight=b["w"]) + cfg.alpha * (rel + feat)

    model = build(ctx, aux_classes=feature_dim(ctx, features_from))
    summary = fit(ctx, model, loss)
    for k, v in seen.items():
        tail = v[-max(1, len(v) // 10) :]
        summary[f"{k}_loss_last"] = sum(tail) / max(1, len(tail))
    summary["relations_from"], summary["features_from"] = ctx.teacher_configs[0].get("arch"), ctx.teacher_configs[1].get("arch")
    return Trained(model, summary)
