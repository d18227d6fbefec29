"""Properties of the list-wise, symmetric, soft-target and expert losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.losses.experts import consistency_kl, load_balancing, logit_adjusted_ce
from stages.losses.listwise import plackett_luce
from stages.losses.logits import forward_kl, reverse_kl, soft_cross_entropy, symmetric_kl


def z(seed, shape=(8, 6), scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_pld_matches_a_direct_plackett_luce_sum():
    s, t = z(0, (1, 4)), z(1, (1, 4))
    y = torch.tensor([2])
    rest = [c for c in t[0].argsort(descending=True).tolist() if c != 2]
    order = [2, *rest]
    w = torch.softmax(t[0], -1)
    expected = sum(w[order[k]] * (torch.logsumexp(s[0, order[k:]], 0) - s[0, order[k]]) for k in range(4))
    assert torch.allclose(plackett_luce(s, t, labels=y), expected)


def test_pld_is_translation_invariant_and_prefers_the_teacher_ranking():
    s, t, y = z(2), z(3), torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plackett_luce(s + 5.0, t, labels=y), plackett_luce(s, t, labels=y))
    # a student that ranks exactly like pi (gold first, then teacher order) beats a reversed one
    key = t.masked_fill(F.one_hot(y, 6).bool(), 1e9)
    ranks = key.argsort(-1, descending=True).argsort(-1).double()
    good, bad = -3.0 * ranks, 3.0 * ranks
    assert plackett_luce(good, t, labels=y) < plackett_luce(bad, t, labels=y)


def test_pld_gradient_is_finite():
    s = z(4).requires_grad_()
    plackett_luce(s, z(5), labels=torch.zeros(8, dtype=torch.long)).backward()
    assert torch.isfinite(s.grad).all()


def test_symmetric_kl_is_the_mean_of_both_directions_and_symmetric():
    s, t = z(6), z(7)
    both = 0.5 * (forward_kl(s, t, temperature=1.0) + reverse_kl(s, t, temperature=1.0))
    assert torch.allclose(symmetric_kl(s, t), both)
    assert torch.allclose(symmetric_kl(s, t), symmetric_kl(t, s))


def test_soft_cross_entropy_with_one_hot_is_ce():
    s, y = z(8), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    assert torch.allclose(soft_cross_entropy(s, F.one_hot(y, 6).double()), F.cross_entropy(s, y))


def test_logit_adjustment_lambda_zero_is_ce_and_lambda_shifts_focus():
    logits = z(9, (8, 3, 6))
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    prior = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64).log()
    plain = logit_adjusted_ce(logits, y, log_prior=prior, lambdas=torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(plain, torch.stack([F.cross_entropy(logits[:, e], y) for e in range(3)]).mean())
    # with a tail-favouring lambda, the gradient pushes tail logits up more than plain CE does
    head, tail = torch.tensor([0]), torch.tensor([5])
    for lam, bigger in ((2.0, True), (-0.5, False)):
        x = torch.zeros(1, 1, 6, dtype=torch.float64, requires_grad=True)
        logit_adjusted_ce(x, tail, log_prior=prior, lambdas=torch.tensor([lam], dtype=torch.float64)).backward()
        g_adj = -x.grad[0, 0, 5].item()
        x2 = torch.zeros(1, 1, 6, dtype=torch.float64, requires_grad=True)
        logit_adjusted_ce(x2, tail, log_prior=prior, lambdas=torch.tensor([0.0], dtype=torch.float64)).backward()
        assert (g_adj > -x2.grad[0, 0, 5].item()) is bigger, lam
    del head


def test_consistency_kl_stops_gradients_into_the_weak_view():
    weak, strong = z(10, (4, 2, 6)).requires_grad_(), z(11, (4, 2, 6)).requires_grad_()
    consistency_kl(strong, weak).backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0
    assert consistency_kl(weak.detach(), weak.detach()).item() == pytest.approx(0.0, abs=1e-12)


def test_load_balancing_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing(uniform, torch.arange(8) % 4).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    assert load_balancing(collapsed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(4.0)
    assert math.isfinite(load_balancing(torch.softmax(z(12, (8, 4)), -1).float(), torch.zeros(8, dtype=torch.long)).item())
