"""``distill --method meta-dmoe``: per-domain expert teachers, an aggregator, and test-time
adaptation of the student to an unseen domain.

Meta-DMoE (Zhong et al., "Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from
Mixture-of-Experts", NeurIPS 2022, Algorithm 1 and eq. 1-3), on data with domains
(``data.domains``; ``--teacher`` k is the expert trained on the k-th domain alone):

1. the student is trained with CE on every source domain (``epochs``; the paper's ERM
   initialisation);
2. meta-training (``meta_epochs``): each batch is cut by domain; each domain's rows are split
   into an unlabelled support half and a labelled query half. The aggregator (one transformer
   layer across the experts' projected features, eq. 1) turns the experts' features of the
   support rows into a target; the expert of the batch's own domain is masked out, so the
   aggregator learns to answer for a domain no expert knows. The student's feature extractor
   takes ``adapt_steps`` gradient steps of size ``adapt_lr`` towards that target, the MSE of
   eq. 2 (the inner, unsupervised step), and the adapted student's CE on the query half
   (eq. 3) trains both the student and the aggregator, through the inner step (second order);
3. test-time adaptation: with ``meta_target`` set, ``adapt_support`` unlabelled train rows of
   that unseen domain take the same inner steps with every expert, and the adapted student is
   the saved model; the meta-trained student before adaptation is saved in ``unadapted/``.
   ``distil evaluate`` of both on the unseen domain measures what adaptation bought.

The experts' features stand for the paper's expert feature extractors; its classifier head is
the student's own head, which adaptation leaves unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stages.classifier.methods.common import Trained, build
from stages.classifier.training import Context, fit
from stages.errors import DistilError
from stages.losses import cross_entropy
from stages.tasks.domains import check_domains, domain_of


class Aggregator(nn.Module):
    """Each expert's features projected to the student's feature size, one transformer encoder
    layer across the experts (one token each), the mean over the experts kept, a linear output."""

    def __init__(self, expert_dims: list[int], dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in expert_dims)
        heads = next(h for h in (4, 2, 1) if dim % h == 0)
        self.mix = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, feats: list[torch.Tensor], keep: list[int]) -> torch.Tensor:
        tokens = torch.stack([self.proj[k](feats[k]) for k in keep], dim=1)  # [N, experts kept, dim]
        return self.out(self.mix(tokens).mean(dim=1))


class _Pair(nn.Module):
    """What meta-training updates: the student and the aggregator."""

    def __init__(self, student: nn.Module, aggregator: Aggregator):
        super().__init__()
        self.student, self.aggregator = student, aggregator


def _features(student, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    scaled = student.scaler(x) if student.scaler is not None else x
    return functional_call(student.trunk, params, (scaled,))


def _logits(student, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    z = student.head(student.drop(_features(student, params, x)))
    return z.view(-1, student.experts, student.num_classes).mean(dim=1)


def adapt(student, x: torch.Tensor, target: torch.Tensor, steps: int, lr: float, *, create_graph: bool) -> dict[str, torch.Tensor]:
    """The student's feature-extractor weights after ``steps`` gradient steps on
    MSE(features(x), target) (eq. 2); differentiable in the original weights and the target
    with ``create_graph``."""
    params = dict(student.trunk.named_parameters())
    for _ in range(steps):
        gap = F.mse_loss(_features(student, params, x), target)
        grads = torch.autograd.grad(gap, list(params.values()), create_graph=create_graph)
        params = {k: v - lr * g for (k, v), g in zip(params.items(), grads, strict=True)}
    return params


def _expert_features(ctx: Context, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.features(x).float() for t in ctx.teachers]


def _meta_loss(ctx: Context, domains: torch.Tensor):
    cfg, k = ctx.cfg, len(ctx.teachers)

    def loss(pair: _Pair, b):
        dom = domains[b["idx"]]
        terms = []
        for d in dom.unique().tolist():
            rows = (dom == d).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=b["g"])]
            if len(rows) < 4:
                continue
            sup, qry = rows[: len(rows) // 2].to(b["x"].device), rows[len(rows) // 2 :].to(b["x"].device)
            x_s = b["x"][sup]
            target = pair.aggregator(_expert_features(ctx, x_s), [e for e in range(k) if e != d])
            fast = adapt(pair.student, x_s, target, cfg.adapt_steps, cfg.adapt_lr, create_graph=True)
            terms.append(cross_entropy(_logits(pair.student, fast, b["x"][qry]), b["y"][qry], weight=b["w"][qry]))
        return torch.stack(terms).mean() if terms else pair.student(b["x"]).sum() * 0.0

    return loss


def _target_support(ctx: Context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``adapt_support`` unlabelled train rows of the unseen domain (a seeded draw), and its
    labelled dev rows (only to report what adaptation did)."""
    from stages.classifier.distill import _tensors
    from stages.tasks import load_examples

    target = load_examples("digits", replace(ctx.data, domains=[ctx.cfg.meta_target], limit=0, long_tail=0.0))
    train, dev = _tensors(target, "train", False), _tensors(target, "dev", False)
    g = torch.Generator().manual_seed(ctx.cfg.seed * 7 + 3)
    pick = torch.randperm(len(train["y"]), generator=g)[: ctx.cfg.adapt_support]
    return train["x"][pick].to(ctx.device), dev


def _accuracy(ctx: Context, model: nn.Module, rows: dict[str, torch.Tensor]) -> float:
    return float((ctx.logits(model, rows["x"]).argmax(1) == rows["y"]).double().mean())


def _check(ctx: Context) -> torch.Tensor:
    """Each train row's domain, once the data and teachers suit the method."""
    cfg, sources = ctx.cfg, ctx.ex.domains
    if len(sources) < 2:
        raise DistilError("meta-dmoe needs data of several domains; set --set 'data.domains=[none,rot90,flip]' on --data digits")
    if len(ctx.teachers) != len(sources):
        raise DistilError(
            f"meta-dmoe needs one expert --teacher per source domain ({len(sources)}: {', '.join(sources)}), "
            f"got {len(ctx.teachers)}; train each with --method ce --set 'data.domains=[NAME]'"
        )
    if cfg.meta_target:
        check_domains([cfg.meta_target])
        if cfg.meta_target in sources:
            raise DistilError(f"meta_target '{cfg.meta_target}' is a source domain; adapt to a domain outside data.domains")
    return torch.from_numpy(domain_of(ctx.train["id"].numpy()))


def meta_dmoe(ctx: Context) -> Trained:
    cfg = ctx.cfg
    domains = _check(ctx)
    student = build(ctx)
    erm = fit(ctx, student, lambda m, b: cross_entropy(m(b["x"]), b["y"], weight=b["w"]), tag="erm")
    probe = _expert_features(ctx, ctx.train["x"][:2].to(ctx.device))
    torch.manual_seed(cfg.seed * 1009 + 17)
    pair = _Pair(student, Aggregator([f.shape[1] for f in probe], student.feature_dim).to(ctx.device))
    meta = fit(ctx, pair, _meta_loss(ctx, domains), tag="meta", epochs=cfg.meta_epochs, predict=lambda m, x: m.student(x))
    summary = {**meta, "erm_dev_accuracy": erm["dev_accuracy"], "source_domains": ctx.ex.domains}
    if not cfg.meta_target:
        return Trained(student, summary)
    support, target_dev = _target_support(ctx)
    student.eval()
    with torch.no_grad():
        target = pair.aggregator(_expert_features(ctx, support), list(range(len(ctx.teachers))))
    fast = adapt(student, support, target, cfg.adapt_steps, cfg.adapt_lr, create_graph=False)
    adapted = copy.deepcopy(student)
    with torch.no_grad():
        for name, p in adapted.trunk.named_parameters():
            p.copy_(fast[name])
    summary.update(
        meta_target=cfg.meta_target, support_rows=len(support),
        target_dev_accuracy_unadapted=_accuracy(ctx, student, target_dev), target_dev_accuracy_adapted=_accuracy(ctx, adapted, target_dev),
    )  # fmt: skip
    return Trained(adapted, summary, {"unadapted": student})
