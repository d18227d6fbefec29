"""The z-score layer a network of tabular features starts with (its statistics saved with the weights)."""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """Per-feature z-score ``(x - mean) / std`` of flat rows ``[N, D]``, with the train
    split's statistics as buffers (saved and loaded with the weights, never trained)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, x: torch.Tensor) -> Standardize:
        """Set the statistics from the rows ``x`` (the train split, nothing else): population
        mean and std in float64. A constant feature (spread within float32 rounding of its
        mean) gets std 1, so it maps to 0 on train rows and never divides by zero."""
        x = x.reshape(len(x), -1).double()
        mean, std = x.mean(0), x.std(0, correction=0)
        constant = std <= 4 * torch.finfo(torch.float32).eps * mean.abs()
        std = torch.where(constant, torch.ones_like(std), std)
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
