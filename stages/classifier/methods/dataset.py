"""``distill --method dataset-distill``: a small synthetic training set learnt by matching expert
training trajectories, and the student it trains.

Matching training trajectories (Cazenavette et al. 2022, "Dataset Distillation by Matching
Training Trajectories", eq. 1-2), with the smooth experts of "Efficient Dataset Distillation
through Alignment with Smooth and High-Quality Expert Trajectories" (2023):

- **experts**: ``dd_experts`` networks of the configured student architecture trained on the real
  train split with SGD (``dd_expert_lr``) for ``dd_expert_epochs``, their parameters saved after
  every epoch: theta*_0 .. theta*_T. They are made smooth, as the second paper asks, with a
  clipped loss (a row's CE above ``dd_clip`` counts as ``dd_clip``, its gradient scaled down to
  match, so a few hard rows cannot jerk the trajectory) and a gradient penalty (``dd_penalty``
  ||grad_theta L||^2, which discourages sharp steps); both are this module's reading of the
  paper's two devices;
- **synthetic set**: ``images_per_class`` rows per class, started from random real rows of
  that class, and a learnt step size alpha (log-parameterised);
- **matching**: from a random expert and start epoch t, N = ``dd_inner_steps`` SGD steps of the
  network on the whole synthetic set from theta*_t, theta_{n+1} = theta_n - alpha grad L_syn(theta_n),
  unrolled; the loss ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (M =
  ``dd_match_epochs``) is back-propagated into the synthetic rows and alpha (Adam, ``dd_image_lr``),
  ``dd_iterations`` times. With 0 iterations the set is the random real rows: the baseline.

Written under ``synthetic/`` as a distil table (kind ``examples``: the synthetic rows as the
train split, the real dev and test rows beside them), so every command trains on it
(``distill --data OUT/synthetic``); the saved model is the configured student trained on it with
CE for ``dd_student_epochs``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.func import functional_call

from stages.artifacts import EXAMPLES, Kind, TableWriter, write_manifest
from stages.classifier.methods.common import Trained, build
from stages.classifier.training import Context, fit
from stages.errors import DistilError
from stages.losses import cross_entropy

SYNTHETIC = "synthetic"


def smooth_expert_loss(net, params: dict, x: torch.Tensor, y: torch.Tensor, clip: float, penalty: float) -> torch.Tensor:
    """Mean clipped CE plus ``penalty`` ||grad L||^2. A row whose CE exceeds ``clip`` (0 = none) counts
    as ``clip`` with its gradient scaled by clip / CE: it still points its way, with bounded weight."""
    per = F.cross_entropy(functional_call(net, params, (x,)), y, reduction="none")
    if clip > 0:
        per = torch.where(per > clip, clip * per / per.detach(), per)
    loss = per.mean()
    if penalty <= 0:
        return loss
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return loss + penalty * sum(g.pow(2).sum() for g in grads)


def expert_trajectories(ctx: Context, net) -> list[list[dict[str, torch.Tensor]]]:
    """Per expert, its parameters at epochs 0..T (each expert its own init and order)."""
    cfg = ctx.cfg
    x, y = ctx.train["x"].to(ctx.device), ctx.train["y"].to(ctx.device)
    out = []
    for e in range(cfg.dd_experts):
        torch.manual_seed(cfg.seed * 1_009 + 17 * e + 1)
        fresh = build(ctx, init=100 + e)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in fresh.named_parameters()}
        path = [{k: v.detach().clone() for k, v in params.items()}]
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + e)
        for _ in range(cfg.dd_expert_epochs):
            for idx in torch.randperm(len(y), generator=g).split(cfg.batch_size):
                loss = smooth_expert_loss(net, params, x[idx], y[idx], cfg.dd_clip, cfg.dd_penalty)
                grads = torch.autograd.grad(loss, list(params.values()))
                with torch.no_grad():
                    for p, gr in zip(params.values(), grads, strict=True):
                        p -= cfg.dd_expert_lr * gr
            path.append({k: v.detach().clone() for k, v in params.items()})
        out.append(path)
    return out


def initial_rows(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """``images_per_class`` random real train rows of every class (seeded)."""
    cfg, y = ctx.cfg, ctx.train["y"]
    g = torch.Generator().manual_seed(cfg.seed)
    xs, ys = [], []
    for c in range(ctx.ex.num_classes):
        rows = (y == c).nonzero().flatten()
        if len(rows) < cfg.images_per_class:
            raise DistilError(f"dataset-distill: class {c} has {len(rows)} train rows, fewer than images_per_class="
                              f"{cfg.images_per_class}; lower it")  # fmt: skip
        pick = rows[torch.randperm(len(rows), generator=g)[: cfg.images_per_class]]
        xs.append(ctx.train["x"][pick])
        ys.append(y[pick])
    return torch.cat(xs).float(), torch.cat(ys)


def match(ctx: Context, net, paths, x_syn: torch.Tensor, y_syn: torch.Tensor) -> tuple[torch.Tensor, float, list[float]]:
    """The synthetic rows after ``dd_iterations`` trajectory-matching updates, the learnt step size and the losses."""
    cfg = ctx.cfg
    x_syn = x_syn.clone().to(ctx.device).requires_grad_(True)
    y_syn = y_syn.to(ctx.device)
    log_lr = torch.tensor(math.log(cfg.dd_expert_lr), device=ctx.device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [x_syn], "lr": cfg.dd_image_lr}, {"params": [log_lr], "lr": 0.01}])
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for _ in range(cfg.dd_iterations):
        path = paths[int(rng.integers(len(paths)))]
        t = int(rng.integers(0, cfg.dd_expert_epochs - cfg.dd_match_epochs + 1))
        start, end = path[t], path[t + cfg.dd_match_epochs]
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        for _ in range(cfg.dd_inner_steps):
            loss = F.cross_entropy(functional_call(net, params, (x_syn,)), y_syn)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: p - log_lr.exp() * g for (k, p), g in zip(params.items(), grads, strict=True)}
        num = sum((params[k] - end[k]).pow(2).sum() for k in params)
        den = sum((start[k] - end[k]).pow(2).sum() for k in params).clamp_min(1e-12)
        matched = num / den
        opt.zero_grad(set_to_none=True)
        matched.backward()
        opt.step()
        losses.append(float(matched.detach()))
    return x_syn.detach().cpu(), float(log_lr.detach().exp()), losses


def write_synthetic(ctx: Context, x: torch.Tensor, y: torch.Tensor, params: dict) -> None:
    """The synthetic train rows with the real dev and test rows, as a distil ``examples`` table."""
    out = ctx.work / SYNTHETIC
    out.mkdir(exist_ok=True)
    for stale in out.glob("part-*.parquet"):
        stale.unlink()
    writer = TableWriter(out, EXAMPLES)
    dev, test = ctx.dev, ctx.ex.split("test")
    test_x = np.asarray(test.column("features").to_pylist(), np.float32) if len(test) else np.zeros((0, x.shape[1]), np.float32)
    parts = [("train", x.numpy(), y.numpy()), ("dev", dev["x"].numpy(), dev["y"].numpy()),
             ("test", test_x, test.column("label").to_numpy().astype(np.int64))]  # fmt: skip
    next_id = 0
    for split, xs, ys in parts:
        n = len(ys)
        writer.write(pa.table({"id": pa.array(range(next_id, next_id + n), pa.int64()), "split": pa.array([split] * n),
                               "label": pa.array(ys, pa.int64()), "features": pa.array(list(xs.astype(np.float32)),
                                                                                      pa.list_(pa.float32()))}))  # fmt: skip
        next_id += n
    write_manifest(out, kind=Kind.EXAMPLES, params=params, inputs={}, rows=writer.done_rows, extra={"task": ctx.ex.meta()["task"]})


def dataset_distill(ctx: Context) -> Trained:
    cfg = ctx.cfg
    if cfg.dd_match_epochs >= cfg.dd_expert_epochs:
        raise DistilError(f"dd_match_epochs ({cfg.dd_match_epochs}) must be below dd_expert_epochs ({cfg.dd_expert_epochs})")
    net = build(ctx)
    x_syn, y_syn = initial_rows(ctx)
    paths = expert_trajectories(ctx, net) if cfg.dd_iterations else []
    x_syn, lr, losses = match(ctx, net, paths, x_syn, y_syn) if cfg.dd_iterations else (x_syn, cfg.dd_expert_lr, [])
    write_synthetic(ctx, x_syn, y_syn, {"images_per_class": cfg.images_per_class, "iterations": cfg.dd_iterations,
                                        "seed": cfg.seed})  # fmt: skip
    n = len(y_syn)
    small = replace(ctx, train={"x": x_syn, "y": y_syn, "w": torch.ones(n), "labeled": torch.ones(n, dtype=torch.bool)},
                    cfg=replace(cfg, batch_size=min(cfg.batch_size, n)))  # fmt: skip
    student = build(ctx, init=7)
    summary = fit(small, student, lambda m, b: cross_entropy(m(b["x"]), b["y"]), tag="synthetic", epochs=cfg.dd_student_epochs)
    tenth = max(1, len(losses) // 10)
    summary.update(synthetic_rows=n, learnt_step_size=lr, match_loss_first=sum(losses[:tenth]) / tenth if losses else None,
                   match_loss_last=sum(losses[-tenth:]) / tenth if losses else None)  # fmt: skip
    return Trained(student, summary)
