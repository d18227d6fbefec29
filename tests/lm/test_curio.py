"""``curio`` (CurioSFT): the per-token temperature, the loss against a hand computation, the fused
path, and the claim in miniature: trained on one answer, it keeps more entropy than CE alone."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.lm.methods.curio import CurioLoss, _entropy, target_temperature
from stages.lm.models import LMSize, build_lm
from stages.lm.training import IGNORE, collate


class Vocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 50


def test_the_temperature_hits_the_target_entropy_inside_its_range_and_stays_low_when_sure():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(4, 50, generator=g) * s for s in (0.5, 2.0, 4.0)])
    tau = target_temperature(z)
    assert ((tau >= 1.1 - 1e-6) & (tau <= 1.5 + 1e-6)).all()
    h = _entropy(z)
    goal = h + 0.5 * torch.sigmoid(2 * (h - 1.2))
    inside = (tau > 1.1 + 1e-3) & (tau < 1.5 - 1e-3)
    assert inside.any()
    assert torch.allclose(_entropy(z[inside] / tau[inside, None]), goal[inside], atol=1e-4)
    sure = torch.full((1, 50), -30.0)
    sure[0, 7] = 30.0
    assert target_temperature(sure).item() == pytest.approx(1.1)


def _toy(dtype=torch.float64):
    torch.manual_seed(0)
    model = build_lm("llama", LMSize(hidden=16, layers=1, heads=2, intermediate=32, context=32), Vocab()).to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = [([5, 6, 7, 8, 9, 10], [IGNORE] * 3 + [8, 9, 10], None, None, 1.0), ([11, 12, 13, 14], [IGNORE] * 2 + [13, 14], None, None, 2.0)]
    return model.train(), collate(rows, 0)


def test_the_first_step_equals_the_hand_computed_loss_fused_or_not():
    model, b = _toy()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    keep = b["labels"][:, 1:] != IGNORE
    z, t = logits[keep], b["labels"][:, 1:][keep]
    lp = torch.log_softmax(z, -1).gather(-1, t[:, None]).squeeze(-1)
    ref = torch.log_softmax(z / target_temperature(z)[:, None], -1).gather(-1, t[:, None]).squeeze(-1)
    w = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0], dtype=lp.dtype)
    expected = ((-lp + 0.5 * (lp - ref) ** 2) * w).sum() / w.sum()
    for chunk in (0, 2, 256):
        got = CurioLoss(chunk)(copy.deepcopy(model), b)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def _fit(model, b, loss_fn, steps=40):
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    keep = b["labels"][:, 1:] != IGNORE
    z = logits[keep]
    return float(_entropy(z).mean()), float(torch.softmax(z, -1).gather(-1, b["labels"][:, 1:][keep][:, None]).mean())


def test_trained_on_one_answer_curio_keeps_more_entropy_than_ce_and_still_learns_it():
    from stages.lm.training import next_token_loss

    model, b = _toy(torch.float32)
    ce_entropy, ce_p = _fit(copy.deepcopy(model), b, lambda m, x: next_token_loss(m, x, chunk=0))
    curio_entropy, curio_p = _fit(copy.deepcopy(model), b, CurioLoss(0))
    assert ce_p > 0.95 and curio_p > 0.95  # both have learned the answer: greedy decoding gives it
    assert curio_entropy > 2 * ce_entropy  # but curio still spreads some mass to other tokens
