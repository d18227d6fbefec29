"""Cross-tokenizer losses (stages.losses.cross_tokenizer): zero at equality, invariances, the
paper's full ULD at k = V and a lower bound below it, hand-computed values, the Bernoulli and
sparse-KL special cases of span_kl, and finite gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stages.losses.cross_tokenizer import CROSS_TOKENIZER, span_kl, uld
from stages.losses.logits import forward_kl


def logits(seed: int, shape=(5, 7), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def full_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Boizard et al.'s closed form: L1 between the sorted probability vectors, zero padded."""
    s = F.softmax(student_logits, -1).sort(-1, descending=True).values
    t = F.softmax(teacher_logits, -1).sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1).mean()


def test_table_names_the_methods():
    assert CROSS_TOKENIZER == {"uld": uld, "span-kd": span_kl}


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_is_zero_against_the_students_own_top_k(k, temperature):
    z = logits(0)
    own = F.log_softmax(z, -1).topk(k, -1).values
    shift = -torch.rand(5, dtype=torch.float64)
    assert uld(z, own, temperature=temperature).item() < 1e-12
    assert uld(z, own.flip(-1), student_shift=shift, teacher_shift=shift).item() < 1e-12  # stored order does not matter


def test_uld_hand_computed():
    z = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    t = torch.tensor([[0.5, 0.3]]).log()
    # ranks: |0.4 - 0.5| + |0.3 - 0.3|, other buckets: |0.3 - 0.2|
    assert uld(z, t).item() == pytest.approx(0.2, abs=1e-6)
    # GOLD's merge: the student's span continues with probability 0.5, scaling its whole vector
    # [0.2, 0.15 | 0.15] against [0.5, 0.3 | 0.2]
    assert uld(z, t, student_shift=torch.tensor([math.log(0.5)])).item() == pytest.approx(0.5, abs=1e-6)
    # masked and weighted mean over spans
    z2, t2 = torch.cat([z, z]), torch.cat([t, F.log_softmax(z, -1).topk(2, -1).values])
    assert uld(z2, t2, weight=torch.tensor([3.0, 1.0])).item() == pytest.approx(0.15, abs=1e-6)
    assert uld(z2, t2, mask=torch.tensor([False, True])).item() == pytest.approx(0.0, abs=1e-6)


def test_uld_is_the_full_distance_at_k_equal_v_and_a_lower_bound_below():
    s, t = logits(1, (6, 5)), logits(2, (6, 9))  # vocabularies of 5 and 9
    full = full_uld(s, t)
    t_lp = F.log_softmax(t, -1)
    assert uld(s, t_lp).item() == pytest.approx(full.item(), abs=1e-9)
    for k in (1, 3, 6):
        assert uld(s, t_lp.topk(k, -1).values).item() <= full.item() + 1e-12


def test_uld_ignores_which_ids_carry_the_mass():
    s, t = logits(3), F.log_softmax(logits(4), -1).topk(4, -1).values
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert uld(s[:, perm], t).item() == pytest.approx(uld(s, t).item(), abs=1e-12)
    assert uld(s, t).item() > 0.05


def test_uld_gradients_are_finite():
    s = logits(5, (4, 3)).requires_grad_()  # a student vocabulary smaller than k
    t = F.log_softmax(logits(6, (4, 6)), -1).topk(5, -1).values
    shift = torch.full((4,), -0.7, dtype=torch.float64, requires_grad=True)
    loss = uld(s, t, student_shift=shift, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(shift.grad).all()
    assert s.grad.abs().sum() > 0


def test_span_kl_zero_at_equality_positive_otherwise():
    lp = F.log_softmax(logits(7, (5, 8)), -1)[:, :4]
    valid = torch.ones_like(lp, dtype=torch.bool)
    assert span_kl(lp, lp.clone(), valid).item() == pytest.approx(0.0, abs=1e-12)
    other = F.log_softmax(logits(8, (5, 8)), -1)[:, :4]
    assert span_kl(other, lp, valid).item() > 1e-3


def test_span_kl_with_one_bucket_is_the_bernoulli_kl():
    p_s, p_t = torch.tensor([0.2, 0.7, 0.05]), torch.tensor([0.5, 0.6, 0.3])
    expected = p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()
    got = span_kl(p_s.log()[:, None], p_t.log()[:, None], torch.ones(3, 1, dtype=torch.bool))
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_span_kl_on_a_shared_vocabulary_is_the_sparse_kl():
    s, t = logits(9, (6, 10)), logits(10, (6, 10))
    t_lp = F.log_softmax(t, -1)
    top = t_lp.topk(4, -1)
    s_at = F.log_softmax(s, -1).gather(-1, top.indices)
    expected = forward_kl(s, (top.indices, top.values), temperature=1.0)
    assert span_kl(s_at, top.values, torch.ones(6, 4, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-9)


def test_span_kl_skips_invalid_buckets_with_finite_gradients():
    s = logits(11, (4, 3)).log_softmax(-1)[:, :3].detach().requires_grad_()
    t = logits(12, (4, 3)).log_softmax(-1)[:, :3]
    valid = torch.tensor([[True, False, True], [True, True, True], [False, False, False], [False, True, False]])
    base = span_kl(s, t, valid, mask=valid.any(1))
    noise = torch.where(valid, 0.0, 5.0)
    assert span_kl(s + noise, t - noise, valid, mask=valid.any(1)).item() == pytest.approx(base.item(), abs=1e-12)
    base.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~valid] == 0).all() and s.grad[valid].abs().sum() > 0
    empty = span_kl(s, t, torch.zeros_like(valid), mask=torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0
