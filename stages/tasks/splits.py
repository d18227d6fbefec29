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


def long_tail_keep(ids: np.ndarray, labels: np.ndarray, ratio: float, num_classes: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows an exponential long-tailed profile keeps: class c keeps
    ``n_0 * ratio ** (-c / (C - 1))`` rows (Cao et al. 2019's CIFAR-LT profile), n_0 the
    count of class 0, the head, which keeps all its rows. Rows are ranked within their
    class by a seeded hash of their id, so applying the profile to an already long-tailed
    table keeps it unchanged."""
    if ratio < 1:
        raise DistilError(f"data.long_tail must be >= 1 (an imbalance ratio), got {ratio}")
    n_head = int((labels == 0).sum()) or int(np.bincount(labels, minlength=num_classes).max())
    rank_key = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)) % np.uint64(2**61 - 1)
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        target = max(1, int(round(n_head * ratio ** (-c / max(num_classes - 1, 1)))))
        keep[rows[np.argsort(rank_key[rows], kind="stable")[:target]]] = True
    return keep
