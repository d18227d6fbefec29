"""Multi-expert students and mixtures of teachers."""

from __future__ import annotations

import numpy as np
import torch

from stages.classifier.methods.common import Trained, build
from stages.classifier.training import Context, fit
from stages.errors import DistilError
from stages.losses import cross_entropy
from stages.losses.experts import consistency_kl, load_balancing, logit_adjusted_ce
from stages.losses.logits import _kl, reduce


def mdcs(ctx: Context) -> Trained:
    """MDCS (Zhao et al., "More Diverse Experts with Consistency Self-distillation for
    Long-tailed Recognition", ICCV 2023). E experts share the trunk.

    - Diversity loss (eq. 2-3): expert e is trained with CE on ``z_e + lambda_e log(prior)``
      on a weak and a strong view, so experts focus on head, balanced or tail classes.
    - Consistency self-distillation (eq. 5): ``KL(p_weak || p_strong)`` per expert, the weak
      view detached as teacher, weighted by a linear ramp over training.
    - Confident instance sampling (eq. 6): only rows whose weak view the experts' mean
      classifies correctly enter the KL.

    The prediction is the mean of the experts' logits (``Classifier.forward``)."""
    cfg, c = ctx.cfg, ctx.ex.num_classes
    e = cfg.model.experts
    if e < 2:
        raise DistilError(f"mdcs needs at least 2 experts, got model.experts={e}; set --set model.experts=3")
    lambdas = cfg.expert_lambdas or np.linspace(-0.5, 2.5, e).tolist()
    if len(lambdas) != e:
        raise DistilError(f"mdcs: expert_lambdas has {len(lambdas)} values for {e} experts; give one per expert")
    counts = torch.bincount(ctx.train["y"], minlength=c).double().clamp_min(1)
    log_prior = (counts / counts.sum()).log().float().to(ctx.device)
    lam = torch.tensor(lambdas, dtype=torch.float32, device=ctx.device)

    def loss(m, b):
        weak = ctx.augment(b["x_raw"].cpu(), "weak", b["g"]).to(ctx.device)
        strong = ctx.augment(b["x_raw"].cpu(), "strong", b["g"]).to(ctx.device)
        zw, zs = m.expert_logits(weak), m.expert_logits(strong)
        diversity = 0.5 * (
            logit_adjusted_ce(zw, b["y"], log_prior=log_prior, lambdas=lam, weight=b["w"])
            + logit_adjusted_ce(zs, b["y"], log_prior=log_prior, lambdas=lam, weight=b["w"])
        )
        confident = zw.mean(1).argmax(-1) == b["y"]
        ramp = (b["epoch"] + 1) / cfg.epochs
        return diversity + cfg.consistency_weight * ramp * consistency_kl(zs, zw, temperature=cfg.temperature, mask=confident)

    model = build(ctx)
    summary = fit(ctx, model, loss)
    summary["expert_lambdas"] = list(lambdas)
    return Trained(model, summary)


def mst(ctx: Context) -> Trained:
    """MST-Distill (mixture of specialised teachers): a gate on the student's features
    scores the K teachers per row; the top-k are mixed with their renormalised gate
    weights into the row's target distribution. Loss = (1 - alpha) CE + alpha T^2
    KL(mixture || student) + balance_weight * load balancing of the gate (section 3.3's
    routing network, with the Switch load-balancing term)."""
    cfg = ctx.cfg
    k = len(ctx.teachers)
    if k < 2:
        raise DistilError(f"mst needs at least two teachers, got {k}; pass --teacher DIR several times")
    if cfg.gate != "confidence":  # `gate` chooses among fixed rules for LM teacher data; this gate is learned
        raise DistilError(f"gate={cfg.gate} is for mst on LM teacher data; classifier mst learns its gate: drop it")
    if not 1 <= cfg.top_k <= k:
        raise DistilError(f"mst: top_k must be between 1 and the number of teachers ({k}), got {cfg.top_k}")
    T = cfg.temperature
    usage = {"counts": torch.zeros(k)}

    def loss(m, b):
        x = b["x"]
        z = m(x)
        with torch.no_grad():
            t_logp = torch.stack([torch.log_softmax(t(x).float() / T, -1) for t in ctx.teachers], dim=1)  # [N, K, C]
        gate = torch.softmax(m.aux_logits(x), -1)
        top_w, top_i = gate.topk(cfg.top_k, dim=-1)
        w = top_w / top_w.sum(-1, keepdim=True)
        chosen = t_logp.gather(1, top_i[..., None].expand(-1, -1, t_logp.shape[-1]))  # [N, k, C]
        mix = torch.logsumexp(chosen + w.clamp_min(1e-12).log()[..., None], dim=1)
        kl = T**2 * reduce(_kl(mix, torch.log_softmax(z / T, -1)), None, b["w"])
        usage["counts"] += torch.bincount(top_i[:, 0].cpu(), minlength=k).float()
        return (
            (1 - cfg.alpha) * cross_entropy(z, b["y"], weight=b["w"])
            + cfg.alpha * kl
            + cfg.balance_weight * load_balancing(gate, top_i[:, 0])
        )

    model = build(ctx, experts=1, aux_classes=k)
    summary = fit(ctx, model, loss)
    share = usage["counts"] / usage["counts"].sum().clamp_min(1)
    summary["teacher_share"] = [float(v) for v in share]
    return Trained(model, summary)
