"""Classification metrics as pure numpy functions, shared by distill, cascade and evaluate."""

from __future__ import annotations

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
