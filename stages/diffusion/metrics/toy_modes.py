"""Mode coverage of 2-D toy samples: which mode each sample belongs to, whether it lies
close to the data, and how evenly the modes are filled.

The modes of each toy (the canonical geometry of the usual generators, in their own
coordinates):

- ``eight-gaussians``: 8 centres on a circle at angles k pi/4 (FFJORD's ``8gaussians``,
  scikit-learn blobs on a circle). A sample belongs to the nearest centre.
- ``moons``: scikit-learn's ``make_moons``: the upper arc (cos t, sin t) and the lower arc
  (1 - cos t, 0.5 - sin t), t in [0, pi]: 2 modes. A sample belongs to the nearer arc.
- ``checkerboard``: the real data's bounding box cut into 4 x 4 cells; the cells holding
  more than half of a uniform share of the real data are the modes (8 for the usual
  checkerboard, whichever parity it has). A sample belongs to the nearest filled cell.
- ``swiss-roll``: the spiral (t cos t, t sin t), t in [1.5 pi, 4.5 pi] (scikit-learn's
  ``make_swiss_roll`` columns x, z). There are no natural modes on one curve, so the arc
  length along the spiral is cut into ``SWISS_ROLL_BINS`` bins, each holding an equal
  share of the real data (so a perfect sampler fills them evenly). A sample belongs to
  the bin of the nearest point of the spiral.

A data set may be scaled and shifted (standardised, divided by 5, ...): ``toy_modes``
fits the canonical geometry to the real data with a per-axis scale and shift (moments
first, then a few alternating nearest-point / least-squares steps, which undo the bias
that the noise adds to the moments); eight-gaussians centres then move to the means of
their real points. Rotations are not fitted: the real data's own coverage (the floor)
shows a geometry that does not fit.

Per sample: the mode (nearest) and the distance to it (to a centre, to an arc, to a
cell: 0 inside). "High quality" means within ``threshold`` of its mode: the
``quantile`` (0.99) of the real data's own distances, at least 1% of the real data's
spread. Then (``mode_coverage``): per-mode counts of all and of high-quality samples;
``hq_rate`` the high-quality share; a mode is *covered* when it holds at least
``min_share`` (10%) of its fair share ``n / K`` of high-quality samples;
``mode_entropy`` = H(high-quality mode histogram) / log K, 1 for evenly filled modes, 0
for one mode (0 also when no sample is high quality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.diffusion.metrics.distances import as_points
from stages.errors import DistilError

SWISS_ROLL_BINS = 8
TOY_NAMES = ("eight-gaussians", "moons", "checkerboard", "swiss-roll")
_ALIASES = {"8gaussians": "eight-gaussians", "8-gaussians": "eight-gaussians", "swissroll": "swiss-roll", "two-moons": "moons"}


def toy_name(data: str) -> str | None:
    """The canonical toy name of ``data`` (``eight_gaussians`` -> ``eight-gaussians``), or None."""
    n = str(data).lower().replace("_", "-")
    n = _ALIASES.get(n, n)
    return n if n in TOY_NAMES else None


@dataclass
class ToyModes:
    """A fitted mode geometry: ``assign(points)`` -> (mode index [N], distance [N])."""

    name: str
    n_modes: int
    threshold: float = 0.0
    centres: np.ndarray | None = None
    """[K, 2] mode centres for eight-gaussians; a representative point per mode otherwise."""
    _points: np.ndarray | None = field(default=None, repr=False)  # dense labelled points (curves, centres)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _boxes: np.ndarray | None = field(default=None, repr=False)  # [K, 4] x0, y0, x1, y1 (checkerboard)

    def assign(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        p = as_points(x, "samples", min_rows=1)
        if p.shape[1] != 2:
            raise DistilError(f"mode coverage is for 2-D samples; got {p.shape[1]}-D")
        if self._boxes is not None:
            b = self._boxes
            dx = np.maximum(np.maximum(b[None, :, 0] - p[:, :1], 0.0), p[:, :1] - b[None, :, 2])
            dy = np.maximum(np.maximum(b[None, :, 1] - p[:, 1:], 0.0), p[:, 1:] - b[None, :, 3])
            d = np.hypot(dx, dy)
            mode = d.argmin(1)
            return mode, d[np.arange(len(p)), mode]
        from scipy.spatial import cKDTree

        dist, idx = cKDTree(self._points).query(p)
        return self._labels[idx], dist


def _canonical(name: str, dense: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense points on the noise-free geometry, uniform in the generator's parameter:
    (points [M, 2], mode labels [M], curve parameter [M])."""
    if name == "eight-gaussians":
        a = np.pi * np.arange(8) / 4
        return np.stack([np.cos(a), np.sin(a)], 1), np.arange(8), a
    if name == "moons":
        t = np.linspace(0, np.pi, dense // 2)
        upper = np.stack([np.cos(t), np.sin(t)], 1)
        lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
        return np.concatenate([upper, lower]), np.repeat([0, 1], len(t)), np.concatenate([t, t])
    if name == "swiss-roll":
        t = np.linspace(1.5 * np.pi, 4.5 * np.pi, dense)
        return np.stack([t * np.cos(t), t * np.sin(t)], 1), np.zeros(dense, dtype=np.int64), t
    raise DistilError(f"no mode geometry for '{name}'; known: {', '.join(TOY_NAMES)}")


def _fit_axis_affine(canon: np.ndarray, real: np.ndarray, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis scale s and shift b with real ~ s * canon + b: moment matching, then
    alternating nearest canonical point / per-axis least squares (ICP with scaling)."""
    from scipy.spatial import cKDTree

    s = real.std(0) / np.maximum(canon.std(0), 1e-12)
    b = real.mean(0) - s * canon.mean(0)
    for _ in range(iters):
        _, idx = cKDTree(canon * s + b).query(real)
        c = canon[idx]
        cc = c - c.mean(0)
        var = (cc * cc).mean(0)
        s_new = np.where(var > 1e-12, (cc * (real - real.mean(0))).mean(0) / np.maximum(var, 1e-12), s)
        s_new = np.where(s_new > 0, s_new, s)  # a flipped or collapsed axis is not a better fit
        b = real.mean(0) - s_new * c.mean(0)
        if np.allclose(s_new, s, rtol=1e-6):
            s = s_new
            break
        s = s_new
    return s, b


def _arc_length(points: np.ndarray) -> np.ndarray:
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(steps)])


def toy_modes(data: str, real: Any, *, quantile: float = 0.99, bins: int = SWISS_ROLL_BINS) -> ToyModes:
    """The mode geometry of toy ``data`` fitted to the real samples ``real`` [N, 2]
    (the training data), with its high-quality threshold."""
    name = toy_name(data)
    if name is None:
        raise DistilError(f"no mode geometry for '{data}'; known: {', '.join(TOY_NAMES)}")
    r = as_points(real, "real data", min_rows=16)
    if r.shape[1] != 2:
        raise DistilError(f"{data}: real data must be 2-D, got {r.shape[1]}-D")
    if name == "checkerboard":
        modes = _checkerboard(r)
    else:
        canon, labels, _ = _canonical(name)
        s, b = _fit_axis_affine(canon, r)
        pts = canon * s + b
        if name == "eight-gaussians":
            for _ in range(5):  # Lloyd steps: centres to the means of their real points
                near = ((r[:, None, :] - pts[None]) ** 2).sum(-1).argmin(1)
                pts = np.stack([r[near == k].mean(0) if (near == k).any() else pts[k] for k in range(8)])
            modes = ToyModes(name, 8, centres=pts, _points=pts, _labels=labels)
        elif name == "moons":
            centres = np.stack([pts[labels == k][len(pts[labels == k]) // 2] for k in (0, 1)])
            modes = ToyModes(name, 2, centres=centres, _points=pts, _labels=labels)
        else:  # swiss roll: equal-real-mass bins of arc length
            from scipy.spatial import cKDTree

            arc = _arc_length(pts)
            _, idx = cKDTree(pts).query(r)
            edges = np.quantile(arc[idx], np.linspace(0, 1, bins + 1)[1:-1])
            labels = np.searchsorted(edges, arc, side="right")
            centres = np.stack([pts[labels == k][len(pts[labels == k]) // 2] for k in range(bins)])
            modes = ToyModes(name, bins, centres=centres, _points=pts, _labels=labels)
    _, dist = modes.assign(r)
    spread = float(np.sqrt(r.var(0).mean()))
    modes.threshold = max(float(np.quantile(dist, quantile)), 0.01 * spread)
    return modes


def _checkerboard(r: np.ndarray, cells: int = 4) -> ToyModes:
    lo, hi = r.min(0), r.max(0)
    side = (hi - lo) / cells
    ij = np.clip(((r - lo) / side).astype(int), 0, cells - 1)
    counts = np.bincount(ij[:, 0] * cells + ij[:, 1], minlength=cells * cells)
    filled = np.flatnonzero(counts > 0.5 * len(r) / (cells * cells))
    i, j = filled // cells, filled % cells
    boxes = np.stack([lo[0] + i * side[0], lo[1] + j * side[1], lo[0] + (i + 1) * side[0], lo[1] + (j + 1) * side[1]], 1)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    return ToyModes("checkerboard", len(filled), centres=centres, _boxes=boxes)


def normalised_entropy(counts: Any, k: int) -> float:
    """H(counts / sum) / log k in [0, 1]; 0 for an empty histogram or k < 2."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0 or k < 2:
        return 0.0
    p = c[c > 0] / total
    return max(0.0, float(-(p * np.log(p)).sum() / np.log(k)))  # max: no "-0.0" for a single mode


def mode_coverage(x: Any, modes: ToyModes, *, min_share: float = 0.1) -> dict[str, Any]:
    """Per-mode counts, high-quality rate, modes covered and normalised mode entropy of
    samples x [N, 2] (definitions in the module docstring)."""
    mode, dist = modes.assign(x)
    hq = dist <= modes.threshold
    k = modes.n_modes
    counts = np.bincount(mode, minlength=k)
    hq_counts = np.bincount(mode[hq], minlength=k)
    need = max(1.0, min_share * len(mode) / k)
    return {
        "n_modes": k,
        "modes_covered": int((hq_counts >= need).sum()),
        "mode_entropy": normalised_entropy(hq_counts, k),
        "hq_rate": float(hq.mean()),
        "mode_counts": counts.tolist(),
        "mode_hq_counts": hq_counts.tolist(),
    }
