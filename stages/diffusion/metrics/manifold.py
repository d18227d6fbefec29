"""Fidelity and diversity of generated samples apart, from k-nearest-neighbour balls in a feature space.

A Frechet distance mixes the two: a generator that drops a third of the modes and one that
blurs every mode can score alike. These split them, each a share in [0, 1] (density can
exceed 1):

- ``precision`` / ``recall``: Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
  for Assessing Generative Models", eq. 1-2. Each set's manifold is the union of balls
  around its points with radius the distance to the point's k-th nearest neighbour in the
  same set; precision is the share of generated samples inside the real manifold, recall the
  share of real samples inside the generated one (a mode-dropping generator loses recall).
- ``density`` / ``coverage``: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
  Generative Models", eq. 5 and 6. Only real balls are used, so an outlier among the generated
  samples does not inflate them: density counts how many real balls hold each generated
  sample (divided by k; 1 on average when the two distributions agree), coverage is the share
  of real balls holding at least one generated sample.

Recall and coverage depend on the number of generated samples, so compare models sampled
with the same ``n`` (the held-out floor, with fewer rows, reads lower). Distances are
Euclidean, computed in blocks with torch (float64); no sample is compared with itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.errors import DistilError

K = 3
"""Neighbours per ball, the value both papers recommend (Kynkaanniemi et al. section 3, Naeem et al. section 4)."""
BLOCK = 2048
"""Rows per block of the distance matrix."""


def knn_radii(x: torch.Tensor, k: int = K) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), BLOCK):
        d = torch.cdist(x[i : i + BLOCK], x)
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def _in_balls(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor):
    """Per block of ``points``: which of the balls (``centres``, ``radii``) hold each point, [block, len(centres)]."""
    for i in range(0, len(points), BLOCK):
        yield torch.cdist(points[i : i + BLOCK], centres) <= radii[None, :]


def manifold_metrics(real: Any, fake: Any, k: int = K) -> dict[str, float]:
    """``precision``, ``recall``, ``density`` and ``coverage`` of ``fake`` [M, d] against ``real`` [N, d] features."""
    r, f = (torch.as_tensor(np.asarray(v, np.float64)) for v in (real, fake))
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise DistilError(f"manifold metrics need two [N, d] feature sets of one width, got {tuple(r.shape)} and {tuple(f.shape)}")
    if len(r) <= k or len(f) <= k:
        raise DistilError(f"manifold metrics with k = {k} need more than {k} real and generated samples, got {len(r)} and {len(f)}")
    r_radius, f_radius = knn_radii(r, k), knn_radii(f, k)
    precise, held, covered = 0, 0, torch.zeros(len(r), dtype=torch.bool)
    for inside in _in_balls(f, r, r_radius):  # generated samples in real balls
        precise += int(inside.any(1).sum())
        held += int(inside.sum())
        covered |= inside.any(0)
    recalled = sum(int(inside.any(1).sum()) for inside in _in_balls(r, f, f_radius))  # real samples in generated balls
    return {"precision": precise / len(f), "recall": recalled / len(r), "density": held / (k * len(f)),
            "coverage": float(covered.double().mean())}  # fmt: skip
