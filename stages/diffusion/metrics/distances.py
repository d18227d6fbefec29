"""Distances between two sets of samples, and the data-vs-data floor each is read against.

Every function takes plain arrays (numpy or torch), one sample per row, and returns a
Python float. A distance alone says little: two finite samples of the *same*
distribution are not at distance 0, so each metric is reported next to its floor, the
same metric between two disjoint sets of real data of the same sizes (``holdout_split``).

- ``sliced_wasserstein``: SW_p via POT. In 2-D the projections are ``n_projections``
  evenly spaced directions on the half circle (a fixed quadrature, no randomness; a
  direction and its opposite give the same 1-D distance); in d > 2 they are seeded
  uniform directions on the sphere.
- ``mmd2``: unbiased MMD^2 (Gretton et al. 2012, eq. 3) with a multi-bandwidth RBF kernel
  ``k(x, y) = mean_b exp(-|x - y|^2 / (2 h_b^2))``. ``mmd_bandwidths`` fixes the
  bandwidths from the *real* data alone (median pairwise distance times
  ``MMD_FACTORS``), so every model is measured with the same kernel; the small factors
  see the fine structure of the toys (a mode's width), the large ones the global layout.
  Unbiased means it can come out slightly negative when the two sets agree.
- ``frechet_distance`` / ``gaussian_stats``: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)
  with scipy's ``sqrtm``, the FID formula in any feature space.
- ``paired_error``: mean over samples of the L2 norm of the difference of two sample sets
  made from the same noise (student vs teacher ODE).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.errors import DistilError

MMD_FACTORS = (0.1, 0.2, 0.5, 1.0, 2.0)
"""Bandwidths of the MMD kernel as multiples of the real data's median pairwise distance."""


def as_points(x: Any, what: str = "samples", min_rows: int = 2) -> np.ndarray:
    """``x`` as a float64 [N, D] array (images are flattened); bad input raises ``DistilError``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        raise DistilError(f"{what}: expected one sample per row ([N, D]), got a vector of shape {a.shape}")
    a = a.reshape(len(a), -1)
    if len(a) < min_rows:
        raise DistilError(f"{what}: need at least {min_rows} samples, got {len(a)}")
    if not np.isfinite(a).all():
        raise DistilError(f"{what}: {int((~np.isfinite(a)).any(1).sum())} samples hold NaN or inf; drop them first")
    return a


def _same_dim(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise DistilError(f"the two sample sets differ in dimension ({x.shape[1]} vs {y.shape[1]})")


def holdout_split(real: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of the real data: (reference, holdout). The floor of a
    metric is ``metric(holdout, reference)`` when no separate test set exists."""
    a = as_points(real, "real data", min_rows=4)
    perm = np.random.default_rng(seed).permutation(len(a))
    half = len(a) // 2
    return a[perm[:half]], a[perm[half:]]


def subsample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows of ``x``, a seeded random subset (all of ``x`` when it is smaller)."""
    if n <= 0 or len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


# ---- sliced Wasserstein --------------------------------------------------------------


def projections(dim: int, n_projections: int = 256, seed: int = 0) -> np.ndarray:
    """[dim, n_projections] unit directions: evenly spaced on the half circle in 2-D,
    seeded uniform on the sphere otherwise."""
    if dim == 2:
        angles = np.pi * np.arange(n_projections) / n_projections
        return np.stack([np.cos(angles), np.sin(angles)])
    p = np.random.default_rng(seed).standard_normal((dim, n_projections))
    return p / np.linalg.norm(p, axis=0, keepdims=True)


def sliced_wasserstein(x: Any, y: Any, *, n_projections: int = 256, p: int = 2, seed: int = 0) -> float:
    """SW_p(x, y) = (mean over directions theta of W_p^p(theta.x, theta.y))^(1/p).

    x [N, D], y [M, D] (N != M is fine: POT compares the 1-D quantile functions). Two
    isotropic Gaussians whose means differ by ``delta`` in 2-D: SW_2 = |delta| / sqrt(2)."""
    import ot

    x, y = as_points(x, "samples x"), as_points(y, "samples y")
    _same_dim(x, y)
    proj = projections(x.shape[1], n_projections, seed)
    return float(ot.sliced_wasserstein_distance(x, y, projections=proj, p=p))


# ---- MMD -----------------------------------------------------------------------------


def median_distance(x: Any, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance among (a seeded subset of) the rows of ``x``."""
    a = subsample(as_points(x, "real data"), max_points, seed)
    d2 = _sq_dists(a, a)[np.triu_indices(len(a), k=1)]
    med = float(np.sqrt(np.median(d2)))
    if med <= 0:
        raise DistilError("real data: the median pairwise distance is 0 (most samples coincide); MMD needs spread-out data")
    return med


def mmd_bandwidths(real: Any, factors: tuple[float, ...] = MMD_FACTORS, seed: int = 0) -> tuple[float, ...]:
    """The kernel bandwidths h_b = factor_b * median pairwise distance of the real data."""
    med = median_distance(real, seed=seed)
    return tuple(float(f * med) for f in factors)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: tuple[float, ...], block: int = 1024) -> float:
    """Sum over all pairs (i, j) of k(a_i, b_j), in row blocks to bound memory."""
    inv = [1.0 / (2.0 * h * h) for h in bandwidths]
    total = 0.0
    for i in range(0, len(a), block):
        d2 = _sq_dists(a[i : i + block], b)
        total += sum(float(np.exp(-d2 * c).sum()) for c in inv) / len(inv)
    return total


def mmd2(x: Any, y: Any, bandwidths: tuple[float, ...]) -> float:
    """Unbiased MMD^2 between the rows of x [N, D] and y [M, D]:
    sum_{i!=j} k(x_i,x_j)/(N(N-1)) + sum_{i!=j} k(y_i,y_j)/(M(M-1)) - 2 sum_{i,j} k(x_i,y_j)/(NM).
    ``bandwidths`` from ``mmd_bandwidths(real)``; k(x, x) = 1 is removed from the
    within-set sums."""
    x, y = as_points(x, "samples x"), as_points(y, "samples y")
    _same_dim(x, y)
    if not bandwidths or min(bandwidths) <= 0:
        raise DistilError(f"MMD bandwidths must be positive, got {bandwidths}")
    n, m = len(x), len(y)
    kxx = (_kernel_sum(x, x, bandwidths) - n) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, bandwidths) - m) / (m * (m - 1))
    kxy = _kernel_sum(x, y, bandwidths) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


# ---- Frechet distance ----------------------------------------------------------------


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] of features [N, d]."""
    f = as_points(features, "features")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 sqrtm(cov1 cov2)) (Heusel et al. 2017, the FID
    formula). A singular product gets ``eps`` on both diagonals (as pytorch-fid does);
    the tiny imaginary part sqrtm returns for a nearly singular product is dropped."""
    import warnings

    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # dead ReLU features make the covariances singular; sqrtm copes
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov1)) * eps
            covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def frechet_between(x: Any, y: Any) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, d], [M, d]."""
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


# ---- paired error --------------------------------------------------------------------


def paired_error(a: Any, b: Any) -> float:
    """mean_i ||a_i - b_i||_2 over samples made from the same noise z_i (e.g. a student's
    one-step sample and the teacher's N-step ODE solution), each sample flattened."""
    a, b = as_points(a, "samples", min_rows=1), as_points(b, "reference samples", min_rows=1)
    if a.shape != b.shape:
        raise DistilError(f"paired error needs samples of the same shape, got {a.shape} and {b.shape}")
    return float(np.linalg.norm(a - b, axis=1).mean())
