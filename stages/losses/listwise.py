"""List-wise distillation: Plackett-Luce ranking loss."""

from __future__ import annotations

import torch

from stages.losses.logits import _wide, reduce


def plackett_luce(student_logits, teacher, *, labels, temperature=1.0, mask=None, weight=None):
    """Plackett-Luce distillation (PLD: A Choice-Theoretic List-Wise Knowledge
    Distillation, eq. 6-7): rank the classes as pi = [gold, then the others by descending
    teacher logit]; with w_k = softmax(z_t / T)[pi_k],

        L = sum_k w_k (logsumexp_{j >= k} z_s[pi_j] - z_s[pi_k]).

    Each term is the negative log-likelihood that the student picks pi_k first among the
    classes not yet ranked, weighted by the teacher's confidence in pi_k; the k = 1 term
    is a (teacher-weighted) cross-entropy on the gold label, so no separate CE is needed.

    student_logits, teacher: [..., C] full logits; labels: [...] gold class ids.
    """
    z_s, z_t = _wide(student_logits), _wide(teacher)
    # order: gold first (its key forced to +inf), the rest by teacher logit, descending
    key = z_t.masked_fill(torch.nn.functional.one_hot(labels.long(), z_t.shape[-1]).bool(), float("inf"))
    order = key.argsort(dim=-1, descending=True)
    s_ranked = z_s.gather(-1, order)
    w = torch.softmax(z_t / temperature, dim=-1).gather(-1, order)
    # logsumexp over the suffix j >= k: reverse, cumulative logsumexp, reverse back
    suffix = torch.logcumsumexp(s_ranked.flip(-1), dim=-1).flip(-1)
    per = (w * (suffix - s_ranked)).sum(-1)
    return reduce(per, mask, weight)
