"""Self-distillation: the model (or its previous generation) is its own teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.classifier.methods.common import Trained, build
from stages.classifier.training import Context, fit
from stages.losses.logits import soft_cross_entropy


def _probs(ctx: Context, model, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(ctx.logits(model, x).double(), dim=-1)


def pskd(ctx: Context) -> Trained:
    """PS-KD (Kim et al., "Self-Knowledge Distillation with Progressive Refinement of
    Targets", ICCV 2021, eq. 3-4): at epoch t the target of row i is
    ``(1 - a_t) onehot(y_i) + a_t p_{t-1}(x_i)`` with ``a_t = a_T * t / T`` and
    ``p_{t-1}(x_i)`` the model's own prediction for that row in the previous epoch,
    stored per row (and checkpointed, so a resumed run keeps them)."""
    cfg = ctx.cfg
    n, c = len(ctx.train["y"]), ctx.ex.num_classes
    past = {"past": torch.full((n, c), 1.0 / c)}
    model = build(ctx)

    def loss(m, b):
        z = m(b["x"])
        a_t = cfg.pskd_alpha * b["epoch"] / cfg.epochs
        onehot = F.one_hot(b["y"], c).to(z.dtype)
        target = (1 - a_t) * onehot + a_t * past["past"][b["idx"]].to(z.device, z.dtype)
        past["past"][b["idx"]] = torch.softmax(z.detach().float(), -1).cpu()  # read next epoch
        return soft_cross_entropy(z, target, weight=b["w"])

    return Trained(model, fit(ctx, model, loss, state=past))


def iterate(ctx: Context) -> Trained:
    """Iterative self-distillation with ground-truth guidance (Borup & Andersen, "Even your
    Teacher Needs Guidance", NeurIPS 2021): round g trains a fresh model on
    ``a * onehot(y) + (1 - a) * p_{g-1}(x)``.

    With ``gt_weight < 0`` a is the closed-form optimum of their section 4 (the projection
    of the ground truth onto the line through the two candidate fits): the fit is linear in
    its targets, so with f1 the fit to the labels alone (round 0) and f0 the fit to
    p_{g-1} alone, f(a) = a f1 + (1 - a) f0 and ``a* = <Y - f0, f1 - f0> / ||f1 - f0||^2``,
    clipped to [0, 1]. We evaluate the inner products on the held-out dev split, which
    estimates generalisation rather than fit (the paper's deep-learning estimate likewise
    trains the two extreme fits once and projects). Every round reuses the same
    initialisation, as the linearisation assumes."""
    cfg = ctx.cfg
    c = ctx.ex.num_classes
    x_train, x_dev = ctx.train["x"], ctx.dev["x"]
    onehot_train = F.one_hot(ctx.train["y"], c).double()
    onehot_dev = F.one_hot(ctx.dev["y"], c).double()

    def soft_target_loss(targets: torch.Tensor):
        return lambda m, b: soft_cross_entropy(m(b["x"]), targets[b["idx"]].to(b["x"].device), weight=b["w"])

    model = build(ctx)
    fit(ctx, model, soft_target_loss(onehot_train), tag="g0")
    f1_dev = _probs(ctx, model, x_dev)
    rounds = [{"generation": 0, "gt_weight": 1.0, "dev_accuracy": float((f1_dev.argmax(1) == ctx.dev["y"]).double().mean())}]
    extra = {"generations/g0": model}
    prev = model
    for g in range(1, cfg.generations + 1):
        prev_train = _probs(ctx, prev, x_train)
        if cfg.gt_weight >= 0:
            a = cfg.gt_weight
        else:
            pure = build(ctx)
            fit(ctx, pure, soft_target_loss(prev_train), tag=f"g{g}-pure")
            f0_dev = _probs(ctx, pure, x_dev)
            diff = f1_dev - f0_dev
            a = float(((onehot_dev - f0_dev) * diff).sum() / diff.pow(2).sum().clamp_min(1e-12))
            a = min(max(a, 0.0), 1.0)
        model = build(ctx)
        fit(ctx, model, soft_target_loss(a * onehot_train + (1 - a) * prev_train), tag=f"g{g}")
        dev_pred = ctx.logits(model, x_dev).argmax(1)
        rounds.append({"generation": g, "gt_weight": a, "dev_accuracy": float((dev_pred == ctx.dev["y"]).double().mean())})
        extra[f"generations/g{g}"] = model
        prev = model
    return Trained(prev, {"generations": rounds}, extra)


def _mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1).mean())


def anchored(ctx: Context) -> Trained:
    """Recursive distillation anchored to the base teacher (Recursive Meta-Distillation,
    the anchored meta-teacher of its section 3): round g distils from
    ``T_g = anchor * p_base + (1 - anchor) * p_{g-1}`` (T_0 = p_base), a convex operator
    that keeps pulling each generation back to the base teacher. The per-round
    KL(p_base || p_g) on train and dev is recorded: the framework predicts it contracts."""
    cfg = ctx.cfg
    if ctx.teachers:
        base_train = _probs(ctx, ctx.teachers[0], ctx.train["x"])
        base_dev = _probs(ctx, ctx.teachers[0], ctx.dev["x"])
    else:
        base_train = torch.softmax(ctx.train["t"].double(), -1)
        base_dev = torch.softmax(ctx.dev["t"].double(), -1)
    target, rounds, extra, model = base_train, [], {}, None
    for g in range(cfg.generations + 1):
        model = build(ctx)
        fixed = target
        fit(ctx, model, lambda m, b, t=fixed: soft_cross_entropy(m(b["x"]), t[b["idx"]].to(b["x"].device), weight=b["w"]),
            tag=f"g{g}")  # fmt: skip
        p_train, p_dev = _probs(ctx, model, ctx.train["x"]), _probs(ctx, model, ctx.dev["x"])
        rounds.append({
            "generation": g,
            "kl_to_base_train": _mean_kl(base_train, p_train),
            "kl_to_base_dev": _mean_kl(base_dev, p_dev),
            "dev_accuracy": float((p_dev.argmax(1) == ctx.dev["y"]).double().mean()),
        })  # fmt: skip
        extra[f"generations/g{g}"] = model
        target = cfg.anchor * base_train + (1 - cfg.anchor) * p_train
    return Trained(model, {"generations": rounds}, extra)
