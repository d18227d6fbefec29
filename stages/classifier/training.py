"""The classifier training loop every distillation method shares.

``fit`` trains one model with a method-supplied loss: per-epoch seeded shuffling and
augmentation, AdamW with cosine decay, best-on-dev selection, dvclive logging, a rich
progress bar, and a checkpoint after every epoch. Methods that train several models in
sequence (generations, probes) call ``fit`` once per model with a distinct ``tag``: a
finished fit is stored under ``fits/<tag>/`` and reloaded on a rerun, an unfinished one
resumes from its last epoch, so a killed multi-stage method resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from stages.artifacts import load_tensors, save_state, save_tensors, write_json
from stages.classifier.models import Standardize, augment_scaled
from stages.config import DistillConfig
from stages.metrics import accuracy, nll, softmax
from stages.runlog import restore
from stages.tasks import Examples

Batch = dict[str, Any]
"""One mini-batch: ``idx`` (rows of the train split), ``x`` (augmented inputs), ``x_raw``,
``y``, ``w`` (row weights), ``t`` (stored teacher logits, when the data has them),
``epoch`` and ``g`` (the epoch's generator, for methods that draw extra views)."""

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class Context:
    """What a method gets: the config, the split tensors, the task and the run's services."""

    cfg: DistillConfig
    ex: Examples
    train: dict[str, torch.Tensor]
    dev: dict[str, torch.Tensor]
    device: torch.device
    work: Path
    live: Any = None
    bar: Any = None
    teachers: list[nn.Module] = field(default_factory=list)
    teacher_configs: list[dict[str, Any]] = field(default_factory=list)
    scaler: Standardize | None = None
    """The z-score of the train split's features that every model a method builds starts
    with (``None``: the network sees raw features)."""
    data: Any = None
    """The run's ``DataConfig`` (how the examples were read and split)."""

    def augment(self, x: torch.Tensor, strength: str, g: torch.Generator) -> torch.Tensor:
        return augment_scaled(x, self.ex.input_shape, strength, g, self.scaler)

    @torch.no_grad()
    def logits(self, model: nn.Module, x: torch.Tensor, fn: Callable | None = None, batch: int = 1024) -> torch.Tensor:
        """Model outputs over ``x`` in eval mode (``fn(model, x)`` instead of ``model(x)``)."""
        was = model.training
        model.eval()
        out = [(fn(model, xb) if fn else model(xb)).float().cpu() for xb in x.to(self.device).split(batch)]
        model.train(was)
        return torch.cat(out)


def fit(
    ctx: Context,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    tag: str = "main",
    epochs: int | None = None,
    params: list[nn.Parameter] | None = None,
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    on_epoch_end: Callable[[nn.Module, int], None] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    select_best: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place (ending with its best-on-dev weights); return a summary.

    ``params``: what to optimise (default: all of the model). ``predict``: dev logits
    (default ``model(x)``). ``state``: per-method tensors (e.g. PS-KD's stored
    predictions) saved in the checkpoint and restored on resume, in place.
    """
    cfg = ctx.cfg
    epochs = epochs or cfg.epochs
    done_dir = ctx.work / "fits" / tag
    if (done_dir / "summary.json").exists():  # finished in an earlier run
        return _reload_finished(done_dir, model, state)

    model.to(ctx.device)
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    ckpt_dir = ctx.work / "checkpoint" / tag
    best_path = ckpt_dir / "best.safetensors"
    progress = _resume(ckpt_dir, model, opt, sched, state)

    task = ctx.bar.add_task(f"{cfg.method} {tag}", total=epochs, completed=progress["epoch"], info="") if ctx.bar else None
    for epoch in range(progress["epoch"], epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(ctx, model, loss_fn, opt, tag, epoch)
        sched.step()
        if on_epoch_end:
            on_epoch_end(model, epoch)
        dev_acc, dev_nll = _dev_scores(ctx, model, predict)
        progress["seconds"] += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": train_loss, "dev_accuracy": dev_acc, "dev_nll": dev_nll}
        progress["history"].append(row)
        _log_epoch(ctx.live, tag, row)
        better = dev_acc > progress["best_acc"] or (dev_acc == progress["best_acc"] and dev_nll < progress["best_nll"])
        if not select_best or cfg.checkpoint == "last" or better:
            progress.update(best_acc=dev_acc, best_nll=dev_nll, best_epoch=epoch + 1)
            save_tensors(best_path, model.state_dict())
        progress["epoch"] = epoch + 1
        save_state(ckpt_dir / "state", {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "progress": progress, "rng": torch.get_rng_state(), "extra": dict(state or {}),
        })  # fmt: skip
        if task is not None:
            ctx.bar.update(task, advance=1, info=f"loss {row['train_loss']:.3f}  dev acc {dev_acc:.4f}")

    model.load_state_dict(load_tensors(best_path))
    return _store_finished(done_dir, ckpt_dir, model, state, progress)


def _reload_finished(done_dir: Path, model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """A fit finished in an earlier run: its weights and method state, in place; its summary."""
    model.load_state_dict(load_tensors(done_dir / "model.safetensors"))
    for k, v in load_tensors(done_dir / "state.safetensors").items():
        if state is not None and k in state:
            state[k].copy_(v)
    return json.loads((done_dir / "summary.json").read_text())


def _resume(
    ckpt_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: LRScheduler, state: dict[str, torch.Tensor] | None
) -> dict[str, Any]:
    """The progress record, restored with model, optimiser, scheduler and RNG from an
    unfinished fit's last checkpoint when there is one (else a fresh record)."""
    progress = {"epoch": 0, "best_acc": -1.0, "best_nll": float("inf"), "best_epoch": -1, "history": [], "seconds": 0.0}
    saved = restore(ckpt_dir, model, opt, sched)
    if saved is not None:
        progress = saved["progress"]
        torch.set_rng_state(saved["rng"])  # dropout draws continue where they stopped
        for k, v in saved["extra"].items():
            state[k].copy_(v)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return progress


def _train_epoch(ctx: Context, model: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer, tag: str, epoch: int) -> float:
    """One pass over the train split in the epoch's seeded order; the mean loss per row.

    The epoch's generator is seeded by (seed, epoch, tag) alone, so a resumed run shuffles
    and augments exactly as an uninterrupted one."""
    cfg, train = ctx.cfg, ctx.train
    model.train()
    n = len(train["y"])
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 7919 + sum(map(ord, tag)))
    order = torch.randperm(n, generator=g)
    total = 0.0
    for i in range(0, n, cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        x_raw = train["x"][idx]
        batch = {
            "idx": idx, "x_raw": x_raw.to(ctx.device), "x": ctx.augment(x_raw, cfg.augment, g).to(ctx.device),
            "y": train["y"][idx].to(ctx.device), "w": train["w"][idx].to(ctx.device),
            "t": train["t"][idx].to(ctx.device) if "t" in train else None, "epoch": epoch, "g": g,
        }  # fmt: skip
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / n


def _dev_scores(ctx: Context, model: nn.Module, predict) -> tuple[float, float]:
    """(accuracy, NLL) of the model on the dev split."""
    probs = softmax(ctx.logits(model, ctx.dev["x"], predict).numpy())
    dev_y = ctx.dev["y"].numpy()
    return accuracy(probs.argmax(1), dev_y), nll(probs, dev_y)


def _log_epoch(live: Any, tag: str, row: dict[str, Any]) -> None:
    if live is None:
        return
    for k in ("train_loss", "dev_accuracy", "dev_nll"):
        live.log_metric(k if tag == "main" else f"{tag}/{k}", row[k], plot=True)
    live.next_step()


def _store_finished(
    done_dir: Path, ckpt_dir: Path, model: nn.Module, state: dict[str, torch.Tensor] | None, progress: dict[str, Any]
) -> dict[str, Any]:
    """Keep the finished fit under ``fits/<tag>/`` (what a rerun reloads) and drop its checkpoint."""
    summary = {
        "best_epoch": progress["best_epoch"],
        "dev_accuracy": progress["best_acc"],
        "dev_nll": progress["best_nll"],
        "train_seconds": progress["seconds"],
        "history": progress["history"],
    }
    done_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(done_dir / "model.safetensors", model.state_dict())
    save_tensors(done_dir / "state.safetensors", dict(state or {}) or {"__empty__": torch.zeros(0)})
    write_json(done_dir / "summary.json", summary)
    shutil.rmtree(ckpt_dir)
    return summary
