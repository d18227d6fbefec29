"""The epoch loop the diffusion methods share, and an exponential moving average of weights.

``fit`` runs AdamW (linear warm-up, cosine decay to a tenth) over seeded epochs of the
train samples; each epoch draws its shuffling, timesteps and noise from one generator
seeded by (seed, epoch), so a run resumed from a checkpoint (safetensors + JSON in
``<work>/checkpoint``, every ``checkpoint_every`` epochs) repeats the uninterrupted one
exactly. A method supplies the loss of a batch and, optionally, per-epoch evaluations.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from stages.artifacts import save_state
from stages.config import DistillConfig
from stages.errors import DistilError
from stages.runlog import restore

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
"""loss(model, a batch of train rows on the device (x0, or whole trajectories), the epoch's CPU generator) -> scalar."""


class EMA:
    """A shadow copy of a model whose weights follow it: w_ema <- d w_ema + (1 - d) w.

    ``warmup`` uses d_n = min(decay, (1 + n) / (10 + n)) after n updates (as diffusers'
    ``EMAModel``), so a short run is not dominated by the initial weights; without it the
    decay is constant (the consistency target of Song et al. 2023, Algorithm 2, mu)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        if not 0 <= decay < 1:
            raise DistilError(f"an EMA decay must be in [0, 1), got {decay}")
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self.updates
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        for shadow, p in zip(self.model.parameters(), model.parameters(), strict=True):
            shadow.lerp_(p.detach(), 1 - d)
        for shadow, b in zip(self.model.buffers(), model.buffers(), strict=True):
            shadow.copy_(b)
        self.updates += 1


def plan(cfg: DistillConfig, rows: int) -> tuple[int, int, int]:
    """(batch size, steps per epoch, epochs) of a run over ``rows`` train rows: ``cfg.steps``
    optimiser steps rounded to whole epochs, or ``cfg.epochs`` when steps is 0."""
    bs = min(cfg.batch_size, rows)
    per_epoch = -(-rows // bs)
    return bs, per_epoch, max(1, round(cfg.steps / per_epoch)) if cfg.steps > 0 else cfg.epochs


def fit(model: nn.Module, ema: EMA, train: torch.Tensor, cfg: DistillConfig, work: Path, loss_fn: LossFn, *,
        device: torch.device, label: str, bar=None, live=None,
        on_epoch: Callable[[int], dict[str, float]] | None = None, sampler: EMA | None = None,
        labels: torch.Tensor | None = None, aux: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` in place and update ``ema`` (and ``sampler``, a second average kept
    for sampling, when given) after every step; returns the progress (history of per-epoch
    rows, seconds). ``on_epoch(epoch)`` adds evaluations to a row. With ``labels`` (one per
    train row) the loss is called ``loss_fn(model, x0, g, y)`` with the batch's labels. ``aux``
    names what else the loss trains (a network, its optimiser: anything with ``state_dict``),
    checkpointed and restored with the rest, so a resumed run continues exactly."""
    if cfg.diffusion.checkpoint_every < 1:
        raise DistilError(f"diffusion.checkpoint_every must be >= 1, got {cfg.diffusion.checkpoint_every}")
    bs, per_epoch, epochs = plan(cfg, len(train))
    total = epochs * per_epoch
    warm = max(1, total // 50)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    averages = {"ema": ema, **({"sampler": sampler} if sampler is not None else {})}
    ckpt = work / "checkpoint"
    progress = _resume(ckpt, model, averages, opt, sched, aux or {})
    task = bar.add_task(label, total=epochs, completed=progress["epoch"], info="") if bar else None
    for epoch in range(progress["epoch"], epochs):
        t0 = time.perf_counter()
        loss = _train_epoch(model, averages, train, cfg, loss_fn, opt, sched,
                            bs=bs, per_epoch=per_epoch, epoch=epoch, device=device, label=label, labels=labels)  # fmt: skip
        row = {"epoch": epoch + 1, "loss": loss}
        model.eval()
        if on_epoch is not None:
            row.update(on_epoch(epoch))
        progress["seconds"] += time.perf_counter() - t0
        progress["history"].append(row)
        progress["epoch"] = epoch + 1
        if live is not None:
            for k, v in row.items():
                if k != "epoch":
                    live.log_metric(k, v)
            live.next_step()
        if (epoch + 1) % cfg.diffusion.checkpoint_every == 0 or epoch + 1 == epochs:
            _save_checkpoint(ckpt, model, averages, opt, sched, progress, aux or {})
        if task is not None:
            bar.update(task, advance=1, info="  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    return progress


def _resume(
    ckpt: Path, model: nn.Module, averages: dict[str, EMA], opt: torch.optim.Optimizer, sched: LRScheduler, aux: dict[str, Any]
) -> dict[str, Any]:
    """The progress record, restored with the model, its averages, optimiser and scheduler
    from the last checkpoint when there is one (else a fresh record)."""
    progress: dict[str, Any] = {"epoch": 0, "history": [], "seconds": 0.0}
    saved = restore(ckpt, model, opt, sched)
    if saved is not None:
        for name, avg in averages.items():
            avg.model.load_state_dict(saved[name])
            avg.updates = saved[f"{name}_updates"]
        for name, part in aux.items():
            part.load_state_dict(saved[f"aux_{name}"])
        progress = saved["progress"]
    ckpt.mkdir(parents=True, exist_ok=True)
    return progress


def _train_epoch(
    model: nn.Module,
    averages: dict[str, EMA],
    train: torch.Tensor,
    cfg: DistillConfig,
    loss_fn: LossFn,
    opt: torch.optim.Optimizer,
    sched: LRScheduler,
    *,
    bs: int,
    per_epoch: int,
    epoch: int,
    device: torch.device,
    label: str,
    labels: torch.Tensor | None = None,
) -> float:
    """One epoch of ``per_epoch`` steps; the mean loss. Shuffling, timesteps and noise all
    come from one generator seeded by (seed, epoch), so a resumed run repeats this epoch."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=g)
    model.train()
    total_loss = 0.0
    for i in range(per_epoch):
        rows = order[i * bs : (i + 1) * bs]
        x0 = train[rows].to(device)
        loss = loss_fn(model, x0, g) if labels is None else loss_fn(model, x0, g, labels[rows].to(device))
        if not torch.isfinite(loss):
            raise DistilError(f"{label}: the loss became {float(loss)} at epoch {epoch + 1}; lower lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        for avg in averages.values():
            avg.update(model)
        total_loss += float(loss.detach())
    return total_loss / per_epoch


def _save_checkpoint(
    ckpt: Path, model: nn.Module, averages: dict[str, EMA], opt: torch.optim.Optimizer, sched: LRScheduler,
    progress: dict[str, Any], aux: dict[str, Any],
) -> None:  # fmt: skip
    ema = averages["ema"]
    state = {
        "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "progress": progress,
    }  # fmt: skip
    if "sampler" in averages:
        state.update(sampler=averages["sampler"].model.state_dict(), sampler_updates=averages["sampler"].updates)
    state.update({f"aux_{name}": part.state_dict() for name, part in aux.items()})
    save_state(ckpt / "state", state)
