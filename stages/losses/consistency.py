"""Distances d(f_theta(x_{t_{n+k}}), f_theta^-(x_{t_n})) of consistency training and
distillation, and the one name -> function table ``CONSISTENCY_LOSSES``.

Inputs: ``pred``, ``target`` [B, ...] (the target carries no gradient), optionally per-sample
weights ``weight`` [B] (iCT's lambda(sigma_i)); output: a scalar, the (weighted) mean over
the batch.
"""

from __future__ import annotations

import math

import torch


def _mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return per_sample.mean() if weight is None else (weight.to(per_sample) * per_sample).mean()


def l2(pred: torch.Tensor, target: torch.Tensor, c: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distance per sample, divided by the sample size (the mean squared
    error of Song et al. 2023, eq. 10 with d = l2^2, as LCM trains)."""
    return _mean(((pred.float() - target.float()) ** 2).flatten(1).mean(1), weight)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sqrt(||pred - target||^2 + c^2) - c per sample (Song & Dhariwal 2023, "Improved
    Techniques for Training Consistency Models", eq. 8); ``c <= 0`` takes their
    c = 0.00054 sqrt(d) for samples of d values. About l2^2 / 2c near 0, l2 far away."""
    diff = (pred.float() - target.float()).flatten(1)
    c = c if c > 0 else 0.00054 * math.sqrt(diff.shape[1])
    return _mean(torch.sqrt((diff**2).sum(1) + c * c) - c, weight)


CONSISTENCY_LOSSES = {"l2": l2, "huber": pseudo_huber}
