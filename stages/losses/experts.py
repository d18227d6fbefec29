"""Losses for multi-expert students and mixtures of teachers."""

from __future__ import annotations

import torch.nn.functional as F

from stages.losses.logits import _kl, reduce


def logit_adjusted_ce(expert_logits, labels, *, log_prior, lambdas, weight=None):
    """MDCS diversity loss (MDCS, eq. 2-3; logit adjustment of Menon et al. 2021): expert e
    is trained with CE on ``z_e + lambda_e * log(prior)``. lambda = 0 is plain CE (head
    classes), 1 balances the classes, > 1 favours the tail, < 0 the head even more.

    expert_logits: [N, E, C]; labels: [N]; log_prior: [C]; lambdas: [E]. Mean over experts."""
    adjusted = expert_logits + lambdas.view(1, -1, 1) * log_prior.view(1, 1, -1)
    n, e, c = adjusted.shape
    per = F.cross_entropy(adjusted.reshape(n * e, c), labels.repeat_interleave(e), reduction="none").view(n, e)
    return reduce(per.mean(1), None, weight)


def consistency_kl(strong_logits, weak_logits, *, temperature=1.0, mask=None):
    """MDCS consistency self-distillation (eq. 5): ``KL(p_weak || p_strong)`` per expert,
    the weak view's prediction detached (it is the teacher). [N, E, C] or [N, C]."""
    t = F.log_softmax(weak_logits.detach() / temperature, dim=-1)
    s = F.log_softmax(strong_logits / temperature, dim=-1)
    per = _kl(t, s)
    if per.dim() == 2:
        per = per.mean(1)
    return temperature**2 * reduce(per, mask)


def load_balancing(gate_probs, chosen):
    """Switch-Transformer load balancing (Fedus et al. 2022, eq. 4), used by MST-Distill's
    router: ``K * sum_i f_i P_i`` with f_i the share of rows whose top choice is teacher i
    and P_i the mean gate probability of teacher i. Equals 1 for a uniform router."""
    k = gate_probs.shape[-1]
    f = F.one_hot(chosen, k).float().mean(0)
    return k * (f * gate_probs.mean(0)).sum()
