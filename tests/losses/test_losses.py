"""Loss properties first (zero at equality, limits, temperature scaling, sparse = full at
k = V, finite gradients), then golden values that only change with --update-golden."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.losses import DIVERGENCES, cross_entropy
from stages.losses.logits import forward_kl, jsd, log_prob_pair, reverse_kl, skew_kl, tvd

GOLDEN = Path(__file__).parent / "golden" / "losses.json"


def logits(seed: int, shape=(6, 5), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    lp, lq = F.log_softmax(p_logits / T, -1), F.log_softmax(q_logits / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_of_identical_distributions_is_zero(name):
    z = logits(0)
    assert DIVERGENCES[name](z, z.clone()).abs().item() < 1e-10


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 20.0))
def test_divergences_are_nonnegative_and_tvd_bounded(seed, scale):
    s, t = logits(seed, scale=scale), logits(seed + 1, scale=scale)
    for name, fn in DIVERGENCES.items():
        assert fn(s, t).item() >= -1e-9, name
    assert tvd(s, t).item() <= 1 + 1e-9


def test_forward_and_reverse_kl_match_the_definition():
    s, t = logits(1), logits(2)
    assert torch.allclose(forward_kl(s, t, temperature=1.0), ref_kl(t, s))
    assert torch.allclose(reverse_kl(s, t, temperature=1.0), ref_kl(s, t))
    assert not torch.allclose(forward_kl(s, t, temperature=1.0), reverse_kl(s, t, temperature=1.0))


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_temperature_scaling_is_T_squared_times_softened_kl(T):
    s, t = logits(3), logits(4)
    assert torch.allclose(forward_kl(s, t, temperature=T), T**2 * ref_kl(t, s, T))


def test_high_temperature_flattens_both_distributions():
    s, t = logits(5), logits(6)
    # KL between softened distributions shrinks like 1/T^2, so T^2 * KL tends to a constant
    values = [forward_kl(s, t, temperature=T).item() / T**2 for T in (1, 10, 100)]
    assert values[0] > values[1] > values[2]


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = logits(7), logits(8)
    assert torch.allclose(jsd(s, t, beta=0.0), ref_kl(t, s))
    assert torch.allclose(jsd(s, t, beta=1.0), ref_kl(s, t))


def test_jsd_normalised_limits_approach_the_endpoints():
    # the O(beta) remainder scales with sum p_t^2 / p_s, so keep probabilities moderate
    s, t = logits(9, scale=1.0), logits(10, scale=1.0)
    eps = 1e-6
    assert jsd(s, t, beta=eps).item() / eps == pytest.approx(ref_kl(t, s).item(), rel=1e-3)
    assert jsd(s, t, beta=1 - eps).item() / eps == pytest.approx(ref_kl(s, t).item(), rel=1e-3)


def test_jsd_half_is_symmetric():
    s, t = logits(11), logits(12)
    assert torch.allclose(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    assert jsd(s, t, beta=0.5).item() <= math.log(2) + 1e-9


def test_skew_kl_zero_skew_is_kl_and_skew_bounds_it():
    s, t = logits(13, scale=8), logits(14, scale=8)
    assert torch.allclose(skew_kl(s, t, skew=0.0), ref_kl(t, s))
    assert skew_kl(s, t, skew=0.1).item() < ref_kl(t, s).item()
    assert skew_kl(s, t, skew=0.1).item() <= -math.log(0.1) + 1e-9  # KL(p || a p + ...) <= log(1/a)
    assert torch.allclose(skew_kl(s, t, skew=0.0, reverse=True), ref_kl(s, t))


def test_tvd_matches_definition():
    s, t = logits(15), logits(16)
    expected = 0.5 * (F.softmax(s, -1) - F.softmax(t, -1)).abs().sum(-1).mean()
    assert torch.allclose(tvd(s, t), expected)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_sparse_teacher_with_all_ids_equals_full_teacher(name):
    s, t = logits(17), logits(18)
    ids = torch.arange(t.shape[-1]).expand_as(t)
    sparse = (ids, F.log_softmax(t, -1))
    assert torch.allclose(DIVERGENCES[name](s, sparse, temperature=1.0), DIVERGENCES[name](s, t, temperature=1.0), atol=1e-6)


def test_sparse_top_k_uses_an_other_bucket():
    s, t = logits(19, shape=(4, 50)), logits(20, shape=(4, 50))
    lp = F.log_softmax(t, -1)
    top = lp.topk(5, dim=-1)
    s_lp, t_lp = log_prob_pair(s, (top.indices, top.values))
    assert s_lp.shape == (4, 6)
    assert torch.allclose(t_lp.exp().sum(-1), torch.ones(4, dtype=t_lp.dtype))
    assert torch.allclose(s_lp.exp().sum(-1), torch.ones(4, dtype=s_lp.dtype))
    assert torch.allclose(t_lp[:, :5], top.values)


def test_mask_and_weight_reduce_over_counted_positions():
    s, t = logits(21, shape=(2, 3, 5)), logits(22, shape=(2, 3, 5))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per = [forward_kl(s[i, j][None], t[i, j][None], temperature=1.0) for i in range(2) for j in range(3) if mask[i, j]]
    assert torch.allclose(forward_kl(s, t, temperature=1.0, mask=mask), torch.stack(per).mean())
    w = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    one = forward_kl(s[0, 0][None], t[0, 0][None], temperature=1.0)
    assert torch.allclose(
        forward_kl(s, t, temperature=1.0, weight=w, mask=mask),
        (2 * one + forward_kl(s[1, 0][None], t[1, 0][None], temperature=1.0)) / 3,
    )


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradients_are_finite_for_extreme_logits(name):
    s = (logits(23, scale=80)).float().requires_grad_()
    t = logits(24, scale=80).float()
    DIVERGENCES[name](s, t).backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_cross_entropy_matches_torch_and_respects_mask():
    z, y = logits(25), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(cross_entropy(z, y), F.cross_entropy(z, y))
    mask = torch.tensor([True, True, False, False, False, False])
    assert torch.allclose(cross_entropy(z, y, mask=mask), F.cross_entropy(z[:2], y[:2]))


def _golden_values() -> dict[str, float]:
    s, t = logits(100, shape=(3, 7)), logits(101, shape=(3, 7))
    return {
        "kd_T2": forward_kl(s, t, temperature=2.0).item(),
        "reverse_kl": reverse_kl(s, t).item(),
        "jsd_0.5": jsd(s, t, beta=0.5).item(),
        "jsd_0.1_T2": jsd(s, t, beta=0.1, temperature=2.0).item(),
        "skew_kl_0.1": skew_kl(s, t, skew=0.1).item(),
        "skew_rkl_0.1": skew_kl(s, t, skew=0.1, reverse=True).item(),
        "tvd": tvd(s, t).item(),
    }


def test_golden_values(update_golden):
    values = _golden_values()
    if update_golden:
        GOLDEN.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden.keys() == values.keys()
    for k, v in golden.items():
        assert values[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("name", ["kd", "jsd", "skew-kl", "tvd"])  # reverse KL is rightly infinite there
def test_masked_teacher_classes_count_as_zero_probability(name):
    s = logits(30)
    t = logits(31)
    t[:, 0] = float("-inf")  # e.g. a vocabulary entry the teacher may never emit
    value = DIVERGENCES[name](s, t, temperature=1.0)
    assert torch.isfinite(value), name
    if name == "kd":  # forward KL simply ignores the impossible class
        lp_t = F.log_softmax(t, -1)[:, 1:]
        lp_s = F.log_softmax(s, -1)[:, 1:]
        assert torch.allclose(value, (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean())
