"""2-D toy distributions for diffusion students: moons, eight gaussians, checkerboard and
swiss roll, drawn with numpy / scikit-learn from a fixed seed (no download).

The shapes follow the toy sets of the FFJORD and flow-matching literature; every set is
standardised afterwards (``stages.diffusion.data``), so their raw scales do not matter.
"""

from __future__ import annotations

import numpy as np


def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31 - 1)))
    return x


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers[rng.integers(0, 8, n)] + 0.15 * rng.standard_normal((n, 2))


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 dark squares of a 4x4 board over [-2, 2]^2."""
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1)


def swiss_roll(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=0.5, random_state=int(rng.integers(2**31 - 1)))
    return x[:, [0, 2]]


TOY2D = {"moons": moons, "eight-gaussians": eight_gaussians, "checkerboard": checkerboard, "swiss-roll": swiss_roll}
