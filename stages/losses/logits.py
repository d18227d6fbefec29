"""Logit-distillation divergences (METHODS.md section 1) as pure tensor functions.

Every divergence has the signature ``(student_logits, teacher, *, temperature, mask,
weight, **hyper) -> scalar`` where

- ``student_logits``: ``[..., V]`` raw student logits;
- ``teacher``: either full teacher logits ``[..., V]`` or a sparse top-k pair
  ``(ids [..., k] int64, logprobs [..., k])`` of stored teacher log-probabilities;
- ``mask``: optional ``[...]`` bool, positions that count (padding excluded);
- ``weight``: optional ``[...]`` per-position weights (selection weights);

and returns the weighted mean over counted positions of the per-position divergence.

Sparse teachers (FIRST, "concentrated knowledge"): the support is the k stored ids plus
one "other" bucket holding the remaining mass, ``1 - sum(exp(logprobs))``; the student is
evaluated on the same k+1 buckets (its log-softmax gathered at the ids plus the log of
its leftover mass). So a sparse divergence is exact on a coarsened distribution and
equals the full one when k = V. Temperature on a sparse teacher divides the k+1 bucket
log-masses by T and renormalises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Teacher = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast: softmax in fp16/bf16 loses the tail the losses need."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_prob_pair(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tempered (log p_s, log p_t) on a common support: all V classes, or top-k + other."""
    if isinstance(teacher, torch.Tensor):
        return (
            F.log_softmax(_wide(student_logits) / temperature, dim=-1),
            F.log_softmax(_wide(teacher) / temperature, dim=-1),
        )
    ids, t_lp = teacher
    t_lp = _wide(t_lp)
    s_full = F.log_softmax(_wide(student_logits), dim=-1)
    s_top = s_full.gather(-1, ids.long())
    s_lp = torch.cat([s_top, _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))], dim=-1)
    t_lp = torch.cat([t_lp, _log1mexp(torch.logsumexp(t_lp, -1, keepdim=True))], dim=-1)
    if temperature != 1.0:
        s_lp = F.log_softmax(s_lp / temperature, dim=-1)
        t_lp = F.log_softmax(t_lp / temperature, dim=-1)
    return s_lp, t_lp


def reduce(per_position: torch.Tensor, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``per_position`` over positions where ``mask`` holds."""
    if mask is None and weight is None:
        return per_position.mean()
    w = torch.ones_like(per_position)
    if mask is not None:
        w = w * mask.to(per_position.dtype)
    if weight is not None:
        w = w * weight.to(per_position.dtype)
    return (per_position * w).sum() / w.sum().clamp_min(1e-12)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, over the last dim; 0 log 0 = 0 (a -inf log p counts as 0)."""
    per = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # fused p * (log p - log q)
    if not torch.isfinite(log_p).all():
        per = per.masked_fill(log_p == float("-inf"), 0.0)
    return per.sum(-1)


def forward_kl(student_logits, teacher, *, temperature=2.0, mask=None, weight=None):
    """``T^2 KL(p_t || p_s)``: Hinton et al., "Distilling the Knowledge in a Neural
    Network" (2015), eq. 2 with the T^2 gradient-scale factor of section 2.1."""
    s, t = log_prob_pair(student_logits, teacher, temperature)
    return temperature**2 * reduce(_kl(t, s), mask, weight)


def reverse_kl(student_logits, teacher, *, temperature=1.0, mask=None, weight=None):
    """``T^2 KL(p_s || p_t)`` (mode seeking): the reverse KL of MiniLLM / the on-policy
    distillation survey, section 3 ("divergence choices")."""
    s, t = log_prob_pair(student_logits, teacher, temperature)
    return temperature**2 * reduce(_kl(s, t), mask, weight)


def jsd(student_logits, teacher, *, beta=0.5, temperature=1.0, mask=None, weight=None):
    """Generalised JSD of GKD (Agarwal et al., "On-Policy Distillation of Language Models",
    eq. 1, as used in the on-policy distillation survey):
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``.

    The formula vanishes at beta = 0 and 1; its normalised limits (divided by beta, or by
    1 - beta) are forward and reverse KL, which beta = 0 and beta = 1 return exactly.
    """
    s, t = log_prob_pair(student_logits, teacher, temperature)
    if beta <= 0:
        per = _kl(t, s)
    elif beta >= 1:
        per = _kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        per = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    return temperature**2 * reduce(per, mask, weight)


def skew_kl(student_logits, teacher, *, skew=0.1, reverse=False, temperature=1.0, mask=None, weight=None):
    """Skew KL of DistiLLM (Ko et al., 2024, eq. 4): ``KL(p_t || a p_t + (1 - a) p_s)``;
    ``reverse=True`` gives the skew reverse KL ``KL(p_s || a p_s + (1 - a) p_t)`` (eq. 5).
    a = 0 recovers the plain KL; the mixture keeps the divergence finite where p_s -> 0."""
    s, t = log_prob_pair(student_logits, teacher, temperature)
    if reverse:
        s, t = t, s
    mix = torch.logsumexp(torch.stack([t + math.log(max(skew, 1e-12)), s + math.log1p(-min(skew, 1 - 1e-12))]), dim=0)
    per = _kl(t, mix) if skew > 0 else _kl(t, s)
    return temperature**2 * reduce(per, mask, weight)


def tvd(student_logits, teacher, *, temperature=1.0, mask=None, weight=None):
    """Total variation ``0.5 sum_v |p_t(v) - p_s(v)|`` (bounded in [0, 1]; DistillKit's
    TVD loss; Wen et al., "f-Divergence Minimization for Sequence-Level KD", table 1)."""
    s, t = log_prob_pair(student_logits, teacher, temperature)
    return reduce(0.5 * (t.exp() - s.exp()).abs().sum(-1), mask, weight)


def symmetric_kl(student_logits, teacher, *, temperature=1.0, mask=None, weight=None):
    """``T^2 (KL(p_t || p_s) + KL(p_s || p_t)) / 2``: the label-free objective of SSLD
    ("Beyond Self-Supervision", Cui et al. 2021, section 3.1: the student matches the
    teacher's prediction only, as PaddleClas' DML loss), so unlabeled rows can be used."""
    s, t = log_prob_pair(student_logits, teacher, temperature)
    return temperature**2 * reduce(0.5 * (_kl(t, s) + _kl(s, t)), mask, weight)


def soft_cross_entropy(student_logits, target_probs, *, temperature=1.0, mask=None, weight=None):
    """``-sum_c q_c log p_s(c)`` against a given target distribution q (e.g. PS-KD's
    mixture of one-hot and past predictions)."""
    log_p = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    return reduce(-(target_probs * log_p).sum(-1), mask, weight)


def cross_entropy(student_logits, labels, *, mask=None, weight=None):
    """Next-label cross-entropy on gold labels, with the same mask/weight reduction."""
    per = F.cross_entropy(_wide(student_logits).flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return reduce(per, mask, weight)
