"""Stratified train/dev/test assignment, fixed by a seed so every stage sees the same split."""

from __future__ import annotations

import numpy as np

from stages.errors import DistilError


def stratified_split(labels: np.ndarray, dev_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Array of 'train' / 'dev' / 'test', stratified per class, deterministic in ``seed``."""
    if not (0 <= dev_frac < 1 and 0 <= test_frac < 1 and dev_frac + test_frac < 1):
        raise DistilError(f"dev_frac ({dev_frac}) and test_frac ({test_frac}) must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_frac))
        n_dev = int(round(len(idx) * dev_frac))
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_dev]] = "dev"
        out[idx[n_test + n_dev :]] = "train"
    return out.astype(str)
