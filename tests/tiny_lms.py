"""Tiny random LMs for tests: weights drawn wide, so greedy answers differ from prompt to
prompt (at transformers' default init every prompt gets the same answer, and a mixed-up
batch or a wrong comparison would go unseen)."""

from __future__ import annotations


def draw_wide(model, std: float, seed: int):
    """``model`` (in place) with every weight but the norms drawn from N(0, std^2), seeded."""
    import torch

    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std, generator=draw)
    return model
