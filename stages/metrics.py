"""Classification metrics as pure numpy functions, shared by distill, cascade and evaluate, and
the paired statistics of two models scored on the same items (``all_pairs``)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean()) if len(labels) else float("nan")


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy per bin."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = idx == b
        rows.append(
            {
                "bin": b,
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": int(sel.sum()),
                "confidence": float(conf[sel].mean()) if sel.any() else float("nan"),
                "accuracy": float(correct[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017, eq. 3) with equal-width bins."""
    n = len(labels)
    return float(
        sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, labels, bins) if r["count"])
    )


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def classification_report(probs: np.ndarray, labels: np.ndarray, num_classes: int, bins: int = 15) -> dict[str, float]:
    pred = probs.argmax(axis=1)
    return {
        "accuracy": accuracy(pred, labels),
        "balanced_accuracy": balanced_accuracy(pred, labels),
        "macro_f1": macro_f1(pred, labels, num_classes),
        "ece": ece(probs, labels, bins),
        "nll": nll(probs, labels),
    }


def shot_accuracy(pred: np.ndarray, labels: np.ndarray, class_counts: np.ndarray, many: int, few: int) -> dict[str, float]:
    """Accuracy on many-shot (train count > many), medium and few-shot (< few) classes, as
    in long-tailed recognition (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an
    Open World"); a group with no classes present is NaN-free: left out."""
    groups = {
        "many_shot_accuracy": class_counts > many,
        "medium_shot_accuracy": (class_counts <= many) & (class_counts >= few),
        "few_shot_accuracy": class_counts < few,
    }
    out = {}
    for name, classes in groups.items():
        rows = np.isin(labels, np.flatnonzero(classes))
        if rows.any():
            out[name] = float((pred[rows] == labels[rows]).mean())
    return out


def expert_metrics(expert_pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-expert accuracy and diversity (mean pairwise disagreement of the experts'
    predictions, MDCS section 4.4) for ``expert_pred`` of shape [N, E]."""
    e = expert_pred.shape[1]
    pairs = [(i, j) for i in range(e) for j in range(i + 1, e)]
    out = {f"expert{i}_accuracy": float((expert_pred[:, i] == labels).mean()) for i in range(e)}
    out["expert_disagreement"] = float(np.mean([(expert_pred[:, i] != expert_pred[:, j]).mean() for i, j in pairs]))
    return out


# Paired statistics of models scored on the same items: is "A beats B" inside the noise?
#
# For every pair of models, on the items both were scored on:
#
# - the **paired bootstrap** interval of the accuracy difference (Efron & Tibshirani, "An
#   Introduction to the Bootstrap", 1993, ch. 13, the percentile interval; as Koehn, "Statistical
#   Significance Tests for Machine Translation Evaluation", EMNLP 2004, uses it): resample the
#   items with replacement, the same draw for both models, and take the 2.5% and 97.5% quantiles
#   of mean(a) - mean(b) over the resamples;
# - **McNemar's test** (McNemar, "Note on the sampling error of the difference between correlated
#   proportions or percentages", Psychometrika 1947): of the items exactly one model gets right,
#   ``a_only`` and ``b_only``, under "no difference" each is Binomial(a_only + b_only, 1/2); the
#   two-sided exact binomial p-value (the exact form, valid for few discordant items too).
#
# Scores may be fractional (a task's partial credit): the bootstrap uses them as they are, McNemar
# counts an item right at score >= 1. ``evaluate`` writes the pairs to ``paired.json`` and prints
# them under the summary table (``stages.report.write_paired``).

RESAMPLES, LEVEL = 10_000, 0.95


def bootstrap_interval(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """The percentile interval at ``level`` of mean(a) - mean(b) over paired resamples of the items."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, 1000):  # 1,000 resamples at a time: [1000, items] indices, never [resamples, items]
        n = min(1000, resamples - s)
        means[s : s + n] = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Items only ``a`` gets right, only ``b`` gets right, and the exact two-sided p-value."""
    from scipy.stats import binomtest

    right_a, right_b = np.asarray(a) >= 1.0, np.asarray(b) >= 1.0
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def compare(a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """One pair on the items both have a score for (NaN = not scored)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    if not len(a):
        return {"items": 0}
    lo, hi = bootstrap_interval(a, b, resamples, level, seed)
    return {"items": int(len(a)), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()), "diff": float(a.mean() - b.mean()),
            "interval": [lo, hi], "level": level, "excludes_zero": bool(lo > 0 or hi < 0), "mcnemar": mcnemar(a, b)}  # fmt: skip


def all_pairs(scores: dict[str, np.ndarray], **kw) -> list[dict[str, Any]]:
    """Every pair of models (in the order given: a before b), each compared on their shared items."""
    return [{"a": x, "b": y, **compare(scores[x], scores[y], **kw)} for x, y in itertools.combinations(scores, 2)]
