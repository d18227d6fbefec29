"""What methods share: the result type, model building and teacher outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stages.classifier.models import Classifier, build_classifier
from stages.classifier.training import Batch, Context


@dataclass
class Trained:
    model: Classifier
    summary: dict[str, Any]
    """Method-specific figures for training.json (per-generation accuracies, probe accuracies, ...)."""
    extra_models: dict[str, Classifier] = field(default_factory=dict)
    """Further models to save beside the main one, by relative directory (``generations/g1``)."""
    model_cfg: Any = None
    """The architecture ``model`` has when it is not the configured one (``student-search``'s winner)."""
    extra_cfgs: dict[str, Any] = field(default_factory=dict)
    """The architecture of an extra model that is not the configured one (``competitive``'s teacher)."""


def build(ctx: Context, *, init: int = 0, experts: int | None = None, aux_classes: int = 0) -> Classifier:
    """The configured student architecture, initialised from seed (``cfg.seed``, ``init``),
    starting with the run's train-split scaler when it has one."""
    m = ctx.cfg.model
    torch.manual_seed(ctx.cfg.seed * 1009 + init)
    model = build_classifier(
        m.arch, m.width, m.depth, m.dropout, ctx.ex.input_shape, ctx.ex.num_classes,
        m.experts if experts is None else experts, aux_classes, standardize=ctx.scaler is not None,
    )  # fmt: skip
    if ctx.scaler is not None:
        model.scaler.load_state_dict(ctx.scaler.state_dict())
    return model.to(ctx.device)


def teacher_logits(ctx: Context, batch: Batch, x: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher on this batch: a live teacher on the student's inputs (function matching),
    else the stored logits of the teacher data."""
    if ctx.teachers:
        with torch.no_grad():
            return ctx.teachers[0](batch["x"] if x is None else x).float()
    return batch["t"]


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
