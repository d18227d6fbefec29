"""`distil cascade` for classifiers: the student answers when it is confident, the
teacher answers the rest.

Policies (``POLICIES``):

- ``confidence``: the student's max softmax probability is its confidence.
- ``views``: the student votes over ``views`` augmented copies of the row (the first one
  clean); confidence is the share of views agreeing with the majority answer, the
  classifier analogue of a self-consistency cascade (METHODS.md section 6).

The threshold is calibrated on the dev split: the lowest threshold (fewest deferrals)
whose dev accuracy reaches the target (default: the teacher's dev accuracy minus
``margin``). Output: ``decisions/`` (one row per test query: route, confidence, answer,
cost), ``policy.json``, ``metrics.json`` and ``calibration.csv`` (the dev curve of
accuracy against teacher rate). ``--policy-file`` reuses a calibrated policy instead of
calibrating. The teacher runs only on deferred test rows; cost per row is measured as
wall time and as FLOPs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.artifacts import (
    CASCADE_DECISIONS,
    DECISIONS,
    Kind,
    Output,
    TableWriter,
    fingerprint,
    list_column_to_numpy,
    write_json,
    write_manifest,
)
from stages.classifier.models import (
    Classifier,
    augment_scaled,
    check_compatible,
    count_flops,
    identity,
    load_classifier,
    predict_logits,
)
from stages.config import CascadeConfig, DataConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.metrics import softmax
from stages.tasks import load_examples, source_identity

POLICIES = {
    "confidence": "student max-probability >= threshold, else defer to the teacher",
    "views": "share of augmented views agreeing with the student's majority >= threshold, else defer",
}


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def student_votes(
    model: Classifier, x: torch.Tensor, cfg: CascadeConfig, input_shape: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(answer, confidence) per row under the cascade policy; views are augmented in the
    space the student sees (its own saved scaler, when it standardises)."""
    if cfg.policy == "confidence":
        probs = softmax(predict_logits(model, x, cfg.batch_size).numpy())
        return probs.argmax(1), probs.max(1)
    g = torch.Generator().manual_seed(cfg.seed)
    votes = [predict_logits(model, x, cfg.batch_size).argmax(1).numpy()]
    for _ in range(cfg.views - 1):
        view = augment_scaled(x, input_shape, cfg.augment, g, model.scaler)
        votes.append(predict_logits(model, view, cfg.batch_size).argmax(1).numpy())
    votes = np.stack(votes, axis=1)
    num_classes = int(votes.max()) + 1
    counts = np.stack([(votes == c).sum(1) for c in range(num_classes)], axis=1)
    # ties go to the clean view's answer so views=1 equals plain argmax
    answer = np.where(counts[np.arange(len(votes)), votes[:, 0]] == counts.max(1), votes[:, 0], counts.argmax(1))
    return answer, counts.max(1) / votes.shape[1]


def calibrate(
    conf: np.ndarray,
    s_ans: np.ndarray,
    t_ans: np.ndarray,
    labels: np.ndarray,
    target: float,
    *,
    margin: float | None = None,
    level: float = 0.0,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, list[dict]]:
    """Lowest threshold whose cascade accuracy reaches the target; the full curve too.

    Sorting rows by confidence makes every threshold's accuracy a prefix sum: rows at or
    above the threshold use the student's answer, the rest the teacher's. With ``level``
    > 0 the target must hold in that share of (Poisson) bootstrap resamples of the rows,
    not just on the rows themselves: a small dev split otherwise picks a threshold that
    happens to fit it. With ``margin`` the target is relative and paired: in each
    resample the cascade must be within ``margin`` of the teacher's accuracy on that
    same resample."""
    order = np.argsort(-conf, kind="stable")
    c, s_ok, t_ok = conf[order], (s_ans == labels)[order], (t_ans == labels)[order]
    n = len(labels)
    always_defer = 1.0 + 1e-6  # above any confidence: every row goes to the teacher
    # candidate cuts: after each distinct confidence value (all rows with conf >= c kept)
    cuts = np.array([0] + [i + 1 for i in range(n) if i == n - 1 or c[i + 1] < c[i]])
    weights = np.ones((1, n))
    if level > 0:
        weights = np.random.default_rng(seed).poisson(1.0, size=(resamples, n)).astype(np.float64)
    total = weights.sum(1, keepdims=True).clip(min=1)
    s_cum = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(weights * s_ok, axis=1)], axis=1)
    t_rest = np.concatenate([np.cumsum((weights * t_ok)[:, ::-1], axis=1)[:, ::-1], np.zeros((len(weights), 1))], axis=1)
    acc = (s_cum[:, cuts] + t_rest[:, cuts]) / total  # [resamples, cuts]
    goal = (t_rest[:, :1] / total - margin) if margin is not None else target
    passed = (acc >= goal - 1e-12).mean(0)
    needed = level if level > 0 else 1.0
    point = (np.concatenate([[0], np.cumsum(s_ok)])[cuts] + np.concatenate([np.cumsum(t_ok[::-1])[::-1], [0]])[cuts]) / n
    curve, best = [], always_defer
    for j, k in enumerate(cuts):
        # any threshold in (c[k], c[k-1]] routes the rows alike: take the conservative end,
        # and 0 once every row goes to the student
        thr = always_defer if k == 0 else 0.0 if k == n else float(c[k - 1])
        curve.append({"threshold": thr, "teacher_rate": (n - k) / n, "accuracy": float(point[j]), "target_met": float(passed[j])})
        if passed[j] >= needed - 1e-12:
            best = min(best, thr)
    return best, curve


def run(
    cfg: CascadeConfig,
    student: Path,
    teacher: Path,
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    policy_file: Path | None = None,
    device: str = "auto",
    models: list[Path] | tuple = (),
    progress: bool = True,
) -> Path:
    """Route the test split between student and teacher."""
    cfg = _checked(cfg, models)
    dev_ = resolve_device(device)
    s_model, t_model, ex, shape = _load_pair(student, teacher, data, data_cfg, dev_)
    split = {s: ex.split(s) for s in ("dev", "test")}
    if split["test"].num_rows == 0:
        raise DistilError(f"{data} has no test rows; the cascade runs on the test split")
    x = {s: torch.from_numpy(list_column_to_numpy(t.column("features"), f"{s} features")) for s, t in split.items()}
    y = {s: t.column("label").to_numpy() for s, t in split.items()}

    if policy_file is not None:
        policy, curve = _read_policy(policy_file, cfg), []
    else:
        if split["dev"].num_rows == 0:
            raise DistilError(f"{data} has no dev rows to calibrate on; pass --policy-file or add a dev split")
        policy, curve = _calibrate_policy(cfg, s_model, t_model, x["dev"], y["dev"], shape)
        policy.update(student=identity(student), teacher=identity(teacher))

    params = {"cascade": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"student": identity(student)["sha256"], "teacher": identity(teacher)["sha256"], "data": source_identity(data),
              "policy": json.dumps(policy, sort_keys=True)}  # fmt: skip
    output = Output(out, fingerprint("cascade", params, inputs))
    with output as work:
        decisions = work / DECISIONS
        shutil.rmtree(decisions, ignore_errors=True)  # routing is cheap to redo: no partial resume
        decisions.mkdir()
        routed = _route(cfg, s_model, t_model, x["test"], shape, policy["threshold"])
        yt = y["test"]
        TableWriter(decisions, CASCADE_DECISIONS).write(_decision_columns(split["test"].column("id").to_numpy(), yt, routed))
        metrics = _metrics(cfg, policy["threshold"], routed, yt)
        write_json(work / "policy.json", policy)
        write_json(work / "metrics.json", metrics)
        _write_curve(work / "calibration.csv", curve)
        write_manifest(decisions, kind=Kind.CASCADE_DECISIONS, params=params, inputs=inputs, rows=len(yt),
                       model={"student": identity(student), "teacher": identity(teacher)},
                       extra={"task": ex.meta()["task"], "metrics": metrics})  # fmt: skip
        return output.commit()


def _checked(cfg: CascadeConfig, models: list[Path] | tuple) -> CascadeConfig:
    """The config with ``auto`` resolved, once its policy is known to apply to classifiers."""
    if models or cfg.online:
        raise DistilError("--model and --online apply to language-model cascades; drop them for classifiers")
    if cfg.policy == "auto":
        cfg = dataclasses.replace(cfg, policy="confidence")
    if cfg.policy not in POLICIES:
        raise DistilError(f"unknown policy '{cfg.policy}'; choose one of {', '.join(POLICIES)}")
    if cfg.policy == "views" and cfg.views < 2:
        raise DistilError("policy views needs views >= 2")
    return cfg


def _load_pair(student: Path, teacher: Path, data: str | Path, data_cfg: DataConfig, device) -> tuple:
    """(student model, teacher model, examples, input shape), checked to share one task."""
    s_model, s_cfg = load_classifier(student, device)
    t_model, t_cfg = load_classifier(teacher, device)
    if s_cfg["num_classes"] != t_cfg["num_classes"] or s_cfg["input_shape"] != t_cfg["input_shape"]:
        raise DistilError("student and teacher disagree on classes or input shape; cascade models trained on the same task")
    ex = load_examples(data, data_cfg)
    check_compatible(s_cfg, ex.num_classes, ex.input_shape, f"student {student}", data)
    return s_model, t_model, ex, s_cfg["input_shape"]


def _read_policy(policy_file: Path, cfg: CascadeConfig) -> dict[str, Any]:
    """A policy calibrated by an earlier ``distil cascade``, for the same policy kind."""
    try:
        policy = json.loads(Path(policy_file).read_text())
        float(policy["threshold"])  # a number, or this is no policy file
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DistilError(f"{policy_file} is not a cascade policy file; calibrate one with `distil cascade`") from None
    if policy.get("policy") != cfg.policy:
        raise DistilError(
            f"{policy_file} calibrates policy '{policy.get('policy')}', not '{cfg.policy}'; pass a matching --policy"
        )
    return policy


def _calibrate_policy(
    cfg: CascadeConfig, s_model: nn.Module, t_model: nn.Module, x: torch.Tensor, y: np.ndarray, shape: list[int]
) -> tuple[dict[str, Any], list[dict]]:
    """The policy calibrated on the dev rows (without the model identities), and its curve."""
    s_ans, conf = student_votes(s_model, x, cfg, shape)
    t_ans = predict_logits(t_model, x, cfg.batch_size).argmax(1).numpy()
    teacher_acc = float((t_ans == y).mean())
    relative = cfg.target_accuracy < 0
    target = teacher_acc - cfg.margin if relative else cfg.target_accuracy
    threshold, curve = calibrate(conf, s_ans, t_ans, y, target, margin=cfg.margin if relative else None,
                                 level=cfg.confidence, seed=cfg.seed)  # fmt: skip
    dev_route = conf >= threshold
    policy = {
        "policy": cfg.policy,
        "threshold": threshold,
        "target_accuracy": target,
        "confidence": cfg.confidence,
        "dev": {
            "accuracy": float((np.where(dev_route, s_ans, t_ans) == y).mean()),
            "teacher_rate": float((~dev_route).mean()),
            "teacher_accuracy": teacher_acc,
            "student_accuracy": float((s_ans == y).mean()),
        },
    }
    return policy, curve


@dataclasses.dataclass
class _Routed:
    """The test rows routed: the student's answers and confidence, the cascade's answers,
    per-row costs, and the teacher-only reference (answers and total time)."""

    student_answer: np.ndarray
    confidence: np.ndarray
    deferred: np.ndarray
    answer: np.ndarray
    row_seconds: np.ndarray
    row_flops: np.ndarray
    teacher_answer: np.ndarray
    teacher_seconds: float
    teacher_flops: int


def _route(cfg: CascadeConfig, s_model: nn.Module, t_model: nn.Module, xt: torch.Tensor, shape: list[int],
           threshold: float) -> _Routed:  # fmt: skip
    """Run the student on every row and the teacher on the deferred ones."""
    n = len(xt)
    (s_ans, conf), s_sec = _timed(student_votes, s_model, xt, cfg, shape)
    deferred = ~(conf >= threshold)
    answer = s_ans.copy()
    t_sec = 0.0
    if deferred.any():
        t_logits, t_sec = _timed(predict_logits, t_model, xt[torch.from_numpy(deferred)], cfg.batch_size)
        answer[deferred] = t_logits.argmax(1).numpy()
    # teacher-only reference (not part of the cascade's cost): answers and time for every row
    t_all, t_all_sec = _timed(predict_logits, t_model, xt, cfg.batch_size)
    views = cfg.views if cfg.policy == "views" else 1
    s_flops, t_flops = count_flops(s_model, shape) * views, count_flops(t_model, shape)
    row_sec = s_sec / n + np.where(deferred, t_sec / max(int(deferred.sum()), 1), 0.0)
    row_flops = s_flops + np.where(deferred, t_flops, 0)
    return _Routed(s_ans, conf, deferred, answer, row_sec, row_flops, t_all.argmax(1).numpy(), t_all_sec, t_flops)


def _decision_columns(ids: np.ndarray, labels: np.ndarray, r: _Routed) -> dict[str, Any]:
    n = len(labels)
    return {
        "id": ids,
        "split": ["test"] * n,
        "label": labels,
        "route": np.where(r.deferred, "teacher", "student").tolist(),
        "confidence": r.confidence.astype(np.float32),
        "answer": r.answer,
        "correct": r.answer == labels,
        "cost_flops": r.row_flops.astype(np.float64),
    }


def _metrics(cfg: CascadeConfig, threshold: float, r: _Routed, labels: np.ndarray) -> dict[str, Any]:
    n = len(labels)
    return {
        "policy": cfg.policy,
        "threshold": threshold,
        "accuracy": float((r.answer == labels).mean()),
        "teacher_rate": float(r.deferred.mean()),
        "student_accuracy": float((r.student_answer == labels).mean()),
        "teacher_accuracy": float((r.teacher_answer == labels).mean()),
        "flops_per_row": float(r.row_flops.mean()),
        "seconds_per_1k_rows": float(r.row_seconds.mean() * 1000),
        "cost_vs_teacher_flops": float(r.row_flops.mean() / r.teacher_flops),
        "cost_vs_teacher_seconds": float(r.row_seconds.mean() / (r.teacher_seconds / n)),
        "rows": n,
    }


def _write_curve(path: Path, curve: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["threshold", "teacher_rate", "accuracy", "target_met"])
        w.writeheader()
        w.writerows(curve)
