"""`distil distill` for classifiers: train a student (or a teacher, with ``--method ce``).

The method table lives in ``stages.classifier.methods.METHODS``: ``ce`` trains on gold labels; the
logit methods (``kd``, ``reverse-kl``, ``jsd``, ``skew-kl``, ``tvd``, ``pld``, ``ssld``)
learn from a teacher, either the ``logits`` column stored by ``generate-teacher-data``
or a live ``--teacher`` run on each (augmented) batch; self-distillation, representation
and multi-expert methods need no teacher, ``mst`` needs several. Rows carry the
selection ``weight`` when the input is a selection.

Flat (tabular) features are standardised by default (``data.standardize``): the student's
network starts with a z-score fitted on its own train split and saved with its weights,
so whoever loads it applies that scaler (``models.Standardize``). Image inputs (digits)
keep their raw [0, 1] pixels: per-pixel z-scores would give the CNN's shifts and the
always-zero border pixels no meaning.

Training keeps the best checkpoint on the dev split, logs per-epoch metrics with dvclive
and checkpoints every epoch into ``<out>.partial/``, so a killed run resumes where it
stopped (same data, params and seed give the same result as an uninterrupted run).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stages.artifacts import Kind, Output, fingerprint, list_column_to_numpy
from stages.classifier.methods import METHODS, Method
from stages.classifier.models import (
    Classifier,
    Standardize,
    check_compatible,
    identity,
    load_classifier,
    param_count,
    save_classifier,
)
from stages.classifier.training import Context
from stages.config import DataConfig, DistillConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.runlog import finish, logged
from stages.tasks import Examples, load_examples, source_identity
from stages.tasks.augment import STRENGTHS
from stages.tasks.splits import stratified_split


def _tensors(ex: Examples, split: str, need_logits: bool) -> dict[str, torch.Tensor]:
    part = ex.split(split)
    out = {
        "x": torch.from_numpy(list_column_to_numpy(part.column("features"), f"{split} features")),
        "y": torch.from_numpy(part.column("label").to_numpy().astype(np.int64)),
        "id": torch.from_numpy(part.column("id").to_numpy().astype(np.int64)),
    }
    if need_logits:
        logits = list_column_to_numpy(part.column("logits"), f"{split} teacher logits")
        if logits.shape[1] != ex.num_classes:
            raise DistilError(
                f"teacher logits have {logits.shape[1]} classes but the task has {ex.num_classes}; regenerate teacher data"
            )
        out["t"] = torch.from_numpy(logits)
    w = part.column("weight").to_numpy().astype(np.float32) if "weight" in part.schema.names else np.ones(len(part), np.float32)
    out["w"] = torch.from_numpy(w)
    return out


def _load_teachers(paths: list[Path], ex: Examples, data, device) -> tuple[list[torch.nn.Module], list[dict]]:
    models, configs = [], []
    for p in paths:
        model, config = load_classifier(p, device)
        check_compatible(config, ex.num_classes, ex.input_shape, f"teacher {p}", data)
        models.append(model)
        configs.append(config)
    counts = {c["num_classes"] for c in configs}
    if len(counts) > 1:
        raise DistilError(
            f"the teachers predict different numbers of classes ({sorted(counts)}); use teachers trained on the same task"
        )
    return models, configs


def _model_config(model: Classifier, ex: Examples, cfg: DistillConfig, class_counts: list[int]) -> dict:
    m = cfg.model
    return {
        "arch": m.arch, "width": m.width, "depth": m.depth, "dropout": m.dropout,
        "experts": model.experts, "aux_classes": model.aux_head.out_features if model.aux_head is not None else 0,
        "input_shape": ex.input_shape, "num_classes": ex.num_classes, "class_names": ex.class_names,
        "task": ex.name, "method": cfg.method, "class_counts": class_counts, "standardize": model.scaler is not None,
        **({"multitask": model.spec} if hasattr(model, "spec") else {}),
    }  # fmt: skip


def run(
    cfg: DistillConfig,
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    teachers: list[Path] | tuple = (),
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train with ``cfg.method`` and write the model to ``out``.

    ``teachers``: model directories run live on every batch, on the same augmented inputs
    the student sees ("function matching": Beyer et al., "Knowledge distillation: A good
    teacher is patient and consistent", CVPR 2022, section 3). Without them, the stored
    ``logits`` column of the data is the teacher.
    """
    teachers = [Path(t) for t in teachers]
    method = _checked_method(cfg, teachers)
    dev_ = resolve_device(device)
    ex = load_examples(data, data_cfg)
    live, live_cfgs = _load_teachers(teachers, ex, data, dev_)
    need_logits = method.teacher == "one" and not live
    if need_logits and "logits" not in ex.table.schema.names:
        raise DistilError(
            f"method '{cfg.method}' needs teacher logits but {data} has none; "
            "run `distil generate-teacher-data` and pass its output, or pass --teacher"
        )
    train, dev = _tensors(ex, "train", need_logits), _tensors(ex, "dev", need_logits)
    if len(train["y"]) == 0 or len(dev["y"]) == 0:
        raise DistilError(f"{data} needs rows in both the train and dev splits; check the split column or data.limit")
    scaler = _fit_scaler(train["x"], ex, data_cfg)  # every train row, before labelled_fraction drops any
    train = _mark_labeled(train, cfg, data_cfg, keep_unlabeled=method.label_free)
    class_counts = torch.bincount(train["y"][train["labeled"]], minlength=ex.num_classes).tolist()

    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data), "teachers": [identity(t)["sha256"] for t in teachers]}
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        with logged(work, progress) as (logger, bar):
            ctx = Context(cfg, ex, train, dev, dev_, work, logger, bar, live, live_cfgs, scaler, data_cfg)
            trained = method.train(ctx)
        saved_cfg = replace(cfg, model=trained.model_cfg) if trained.model_cfg is not None else cfg
        save_classifier(work, trained.model, _model_config(trained.model, ex, saved_cfg, class_counts))
        for rel, model in trained.extra_models.items():
            own = trained.extra_cfgs.get(rel)
            save_classifier(work / rel, model, _model_config(model, ex, replace(cfg, model=own) if own else cfg, class_counts))
        summary = {
            "method": cfg.method,
            "params": param_count(trained.model),
            "train_rows": len(train["y"]),
            "labeled_rows": int(train["labeled"].sum()),
            **trained.summary,
        }
        finish(work, summary, kind=Kind.MODEL, params=params, inputs=inputs, extra={"task": ex.meta()["task"]})
        return output.commit()


def _fit_scaler(train_x: torch.Tensor, ex: Examples, data_cfg: DataConfig) -> Standardize | None:
    """The z-score of the train split's features, for flat feature rows when
    ``data.standardize`` is on; ``None`` for images and when it is off."""
    if not data_cfg.standardize or len(ex.input_shape) != 1:
        return None
    return Standardize(ex.input_shape[0]).fit(train_x)


def _checked_method(cfg: DistillConfig, teachers: list[Path]) -> Method:
    """The method of ``cfg``, once the settings and the number of teachers suit it."""
    if cfg.method not in METHODS:
        raise DistilError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    if cfg.augment not in STRENGTHS:
        raise DistilError(f"unknown augment '{cfg.augment}'; choose one of {', '.join(STRENGTHS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DistilError("epochs, batch_size and lr must be positive")
    if cfg.checkpoint not in ("best", "last"):
        raise DistilError(f"checkpoint must be best or last, got '{cfg.checkpoint}'")
    if not 0 < cfg.labeled_fraction <= 1:
        raise DistilError(f"labeled_fraction must be in (0, 1], got {cfg.labeled_fraction}")
    if method.teacher == "none" and teachers:
        raise DistilError(f"method '{cfg.method}' uses no teacher; drop --teacher")
    if method.teacher == "one" and len(teachers) > 1:
        raise DistilError(f"method '{cfg.method}' learns from one teacher, got {len(teachers)}; use mst for several")
    if method.teacher == "many" and len(teachers) < 2:
        raise DistilError(f"method '{cfg.method}' needs at least two teachers; pass --teacher DIR several times")
    if method.teachers and len(teachers) != method.teachers:
        raise DistilError(f"method '{cfg.method}' learns from exactly {method.teachers} teachers, got {len(teachers)}")
    if method.live and not teachers:
        raise DistilError(f"method '{cfg.method}' runs the teacher itself (its features or its training), which stored teacher "
                          "data cannot stand in for: pass --teacher DIR")  # fmt: skip
    return method


def _mark_labeled(
    train: dict[str, torch.Tensor], cfg: DistillConfig, data_cfg: DataConfig, *, keep_unlabeled: bool
) -> dict[str, torch.Tensor]:
    """The train tensors with a ``labeled`` mask: all rows, or a stratified
    ``labeled_fraction`` of them (the rest dropped unless the method learns without labels)."""
    train["labeled"] = torch.ones(len(train["y"]), dtype=torch.bool)
    if cfg.labeled_fraction < 1:
        split = stratified_split(train["y"].numpy(), 0.0, 1 - cfg.labeled_fraction, data_cfg.split_seed)
        train["labeled"] = torch.from_numpy(split == "train")
        if not keep_unlabeled:
            train = {k: v[train["labeled"]] for k, v in train.items()}
    return train
