"""Losses between intermediate representations of a student and a teacher (features [N, D],
the batch's rows as samples): a FitNets hint, the MI-alpha bound of Distiller, and sample
relations (Hybrid Distillation's token relations, here between the rows of a batch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def standardised(t: torch.Tensor) -> torch.Tensor:
    """Teacher features z-scored per dimension over the batch (detached): a regression target of unit scale."""
    t = t.detach().float()
    return (t - t.mean(0)) / t.std(0, correction=0).clamp_min(1e-6)


def hint_mse(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss (Romero et al. 2015, eq. 3): ||r(h_s) - h_t||^2 / 2 with r a learnt
    regressor (the student's projection head), the teacher's features standardised; mean per row."""
    return 0.5 * (projected - standardised(teacher)).pow(2).sum(-1).mean() / projected.shape[-1]


def cosine_scores(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """f(a_i, b_j) = cos(a_i, b_j) / temperature, [N, N]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature


def mi_alpha_bound(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """The interpolated lower bound I_alpha on the mutual information of paired rows (Poole et al.
    2019, "On Variational Bounds of Mutual Information", section 2.4, eq. 13), which Distiller (He
    et al. 2021, section 3.3) uses as its MI-alpha intermediate-distillation objective.

    ``scores`` [K, K] hold the critic f(x_i, y_j), row i's pair on the diagonal. The baseline of a
    pair interpolates the leave-one-out multi-sample mean of InfoNCE with NWJ's constant a = e:
    b_i^(-j) = log(alpha mean_{k != j} e^{f(x_i, y_k)} + (1 - alpha) e), and

        I_alpha = 1 + mean_{i, j != i} [f(x_i, y_i) - b_i^(-j)] - mean_{i, j != i} e^{f(x_i, y_j) - b_i^(-i)}

    (the positive against means that hold it, each negative against the mean of the other
    negatives, as Poole et al.'s estimator). alpha = 0 is NWJ's bound (unbiased, high variance),
    alpha = 1 a leave-one-out InfoNCE bounded by log(K - 1) (low variance): alpha trades the two.
    Constant scores give 0."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = scores.shape[0]
    if k < 2:
        raise ValueError("the I_alpha bound needs a batch of at least 2 pairs")
    scores = scores.double()
    lse = torch.logsumexp(scores, dim=1, keepdim=True)
    # log sum_{k != j}: lse + log(1 - share_j), exact for every term but a row's largest (share <= 1/2); the
    # largest, whose removal would cancel catastrophically, gets the row's logsumexp without it
    rows, top = torch.arange(k, device=scores.device), scores.argmax(1)
    without_top = torch.logsumexp(scores.index_put((rows, top), torch.tensor(float("-inf"), dtype=scores.dtype)), dim=1)
    share = (scores - lse).exp()
    is_top = torch.zeros_like(scores, dtype=torch.bool).index_put((rows, top), torch.tensor(True))
    rest = lse + torch.log1p(-share.masked_fill(is_top, 0.0))
    loo = torch.where(is_top, without_top[:, None], rest) - math.log(k - 1)  # [i, j]: log mean_{k != j} e^{f(x_i, y_k)}
    if alpha == 1:
        base = loo
    elif alpha == 0:
        base = torch.ones_like(loo)
    else:
        base = torch.logaddexp(math.log(alpha) + loo, torch.full_like(loo, math.log(1 - alpha) + 1.0))
    off = ~torch.eye(k, dtype=torch.bool, device=scores.device)
    joint = (scores.diagonal()[:, None] - base)[off].mean()
    marginal = torch.exp(scores - base.diagonal()[:, None])[off].mean()
    return (1 + joint - marginal).to(torch.float32)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(R_t || R_s) averaged over rows, R the softmax over the other rows j != i of the cosine
    similarities / temperature: the batch's sample relations, as Hybrid Distillation (Shi et al.
    2023, section 3.2) has the student imitate a teacher's token relations (its attention maps)."""
    k = student.shape[0]
    eye = torch.eye(k, dtype=torch.bool, device=student.device)
    s = cosine_scores(student, student, temperature).masked_fill(eye, float("-inf"))
    with torch.no_grad():
        t = cosine_scores(teacher, teacher, temperature).masked_fill(eye, float("-inf"))
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    per = (log_t.exp() * (log_t - log_s)).masked_fill(eye, 0.0).sum(-1)
    return per.mean()
