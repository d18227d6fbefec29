"""Methods that train one student against one teacher's logits (or gold labels only)."""

from __future__ import annotations

from stages.classifier.methods.common import Trained, build, teacher_logits
from stages.classifier.training import Context, fit
from stages.losses import DIVERGENCES, cross_entropy, divergence_hyper
from stages.losses.listwise import plackett_luce
from stages.losses.logits import symmetric_kl


def ce(ctx: Context) -> Trained:
    model = build(ctx)
    summary = fit(ctx, model, lambda m, b: cross_entropy(m(b["x"]), b["y"], weight=b["w"]))
    return Trained(model, summary)


def divergence(name: str):
    """``alpha * D(p_t, p_s) + (1 - alpha) * CE`` for a divergence of ``DIVERGENCES``."""

    def train(ctx: Context) -> Trained:
        cfg = ctx.cfg
        fn = DIVERGENCES[name]
        hyper = divergence_hyper(name, cfg)

        def loss(m, b):
            z = m(b["x"])
            distil = fn(z, teacher_logits(ctx, b), weight=b["w"], **hyper)
            return cfg.alpha * distil + (1 - cfg.alpha) * cross_entropy(z, b["y"], weight=b["w"])

        model = build(ctx)
        return Trained(model, fit(ctx, model, loss))

    train.__name__ = name
    return train


def pld(ctx: Context) -> Trained:
    """Plackett-Luce distillation: one list-wise loss, no separate CE term (its first term is it)."""
    model = build(ctx)

    def loss(m, b):
        return plackett_luce(m(b["x"]), teacher_logits(ctx, b), labels=b["y"], temperature=ctx.cfg.temperature, weight=b["w"])

    return Trained(model, fit(ctx, model, loss))


def ssld(ctx: Context) -> Trained:
    """SSLD: match the teacher only (symmetric KL), so rows without labels count too."""
    model = build(ctx)

    def loss(m, b):
        return symmetric_kl(m(b["x"]), teacher_logits(ctx, b), temperature=ctx.cfg.temperature, weight=b["w"])

    return Trained(model, fit(ctx, model, loss))
