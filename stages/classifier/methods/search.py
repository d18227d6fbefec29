"""``distill --method student-search``: pick the student architecture for a teacher without
training any candidate, then train the winner.

DisWOT (Dong et al. 2023, "DisWOT: Student Architecture Search for Distillation WithOut
Training", section 3): the students that distil best from a teacher are those whose
*randomly initialised* features already resemble the teacher's, in two matrices over a batch of
inputs (``SEARCH_ROWS`` train rows):

- **sample relations** (their eq. 4, after Similarity-Preserving KD): G = row-normalised F F^T of
  the batch's features F; distance ||G_s - G_t||^2 / ||G_t||^2;
- **feature semantics** (their eq. 2-3, class-activation similarity): each class c's
  gradient-weighted activation A_c = (dz_c / dF) * mean F (Grad-CAM's channel weights times the
  activation; with a linear head dz_c / dF is that class's head row), and the C x C cosine
  similarity of the A_c; distance the same way (relative, so that the two terms weigh alike:
  DisWOT's matrices are normalised so, ours differ in size).

The score is -(relation distance + semantic distance), averaged over ``INITS`` random
initialisations. Candidates are this package's MLPs and CNNs (``WIDTHS`` x ``DEPTHS``) within
``search_budget`` parameters (0: the configured student's count); DisWOT's evolutionary search
(their Algorithm 1) keeps the better half of ``search_population`` candidates each generation and
refills it with mutants (a width step, a depth step, or the other architecture), for
``search_generations`` generations. The ranking goes to ``search.json`` (kept, so a rerun trains
the same winner), then ``search_method`` (kd by default) trains the winner; training.json records
the search's and the training's seconds.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from stages.artifacts import write_json
from stages.classifier.methods.common import Trained
from stages.classifier.models import build_classifier, param_count
from stages.classifier.training import Context
from stages.config import ModelConfig
from stages.errors import DistilError

WIDTHS = {"mlp": [16, 24, 32, 48, 64, 96, 128, 192, 256], "cnn": [4, 6, 8, 12, 16, 24, 32]}
DEPTHS = {"mlp": [1, 2, 3], "cnn": [1, 2, 3]}
SEARCH_ROWS, INITS = 256, 2


def relation_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = row-normalised F F^T over the batch [N, N]."""
    f = features.flatten(1).double()
    return F.normalize(f @ f.T, dim=1)


def semantic_matrix(model, x: torch.Tensor) -> torch.Tensor:
    """C x C cosine similarity of the classes' gradient-weighted activations (W_c * mean F)."""
    f = model.features(x).flatten(1).double()
    activation = model.head.weight.double()[: model.num_classes] * f.mean(0)
    a = F.normalize(activation, dim=1)
    return a @ a.T


def distance(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """||S - T||^2 / ||T||^2: relative, so the relation and semantic terms weigh alike."""
    return float((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12))


def candidate_space(ctx: Context, budget: int) -> list[ModelConfig]:
    """Every candidate within the budget (CNNs only for image inputs)."""
    shape, classes = ctx.ex.input_shape, ctx.ex.num_classes
    archs = ["mlp", "cnn"] if len(shape) == 3 else ["mlp"]
    out = []
    for arch in archs:
        for width in WIDTHS[arch]:
            for depth in DEPTHS[arch]:
                m = ModelConfig(arch=arch, width=width, depth=depth, dropout=ctx.cfg.model.dropout)
                if param_count(build_classifier(arch, width, depth, 0.0, shape, classes)) <= budget:
                    out.append(m)
    return out


def score(ctx: Context, m: ModelConfig, x: torch.Tensor, teacher_rel: torch.Tensor, teacher_sem: torch.Tensor) -> dict:
    """DisWOT's distances of a randomly initialised candidate (mean over INITS inits)."""
    rel, sem = [], []
    for init in range(INITS):
        torch.manual_seed(ctx.cfg.seed * 7919 + init)
        net = build_classifier(m.arch, m.width, m.depth, 0.0, ctx.ex.input_shape, ctx.ex.num_classes,
                               standardize=ctx.scaler is not None).to(ctx.device).eval()  # fmt: skip
        if ctx.scaler is not None:
            net.scaler.load_state_dict(ctx.scaler.state_dict())
        with torch.no_grad():
            rel.append(distance(relation_matrix(net.features(x)), teacher_rel))
            sem.append(distance(semantic_matrix(net, x), teacher_sem))
        params = param_count(net)
    r, s = sum(rel) / INITS, sum(sem) / INITS
    return {"arch": m.arch, "width": m.width, "depth": m.depth, "params": params, "relation_distance": r,
            "semantic_distance": s, "score": -(r + s)}  # fmt: skip


def mutate(m: ModelConfig, rng: random.Random, archs: list[str]) -> ModelConfig:
    """One step: a neighbouring width, a neighbouring depth, or the other architecture."""
    move = rng.choice(["width", "depth", "arch"] if len(archs) > 1 else ["width", "depth"])
    if move == "arch":
        arch = next(a for a in archs if a != m.arch)
        return replace(m, arch=arch, width=rng.choice(WIDTHS[arch]), depth=rng.choice(DEPTHS[arch]))
    values = WIDTHS[m.arch] if move == "width" else DEPTHS[m.arch]
    i = values.index(m.width if move == "width" else m.depth)
    j = min(max(i + rng.choice([-1, 1]), 0), len(values) - 1)
    return replace(m, width=values[j]) if move == "width" else replace(m, depth=values[j])


def search(ctx: Context) -> dict:
    """The evolutionary search: every candidate scored, best first, with the winner."""
    cfg = ctx.cfg
    teacher = ctx.teachers[0].eval()
    budget = cfg.search_budget or param_count(build_classifier(cfg.model.arch, cfg.model.width, cfg.model.depth, 0.0,
                                                               ctx.ex.input_shape, ctx.ex.num_classes))  # fmt: skip
    space = candidate_space(ctx, budget)
    if not space:
        raise DistilError(f"student-search: no candidate student has at most search_budget={budget} parameters; raise it")
    g = torch.Generator().manual_seed(cfg.seed)
    x = ctx.train["x"][torch.randperm(len(ctx.train["x"]), generator=g)[:SEARCH_ROWS]].to(ctx.device)
    with torch.no_grad():
        t_rel, t_sem = relation_matrix(teacher.features(x)), semantic_matrix(teacher, x)
    rng = random.Random(cfg.seed)
    key = lambda m: (m.arch, m.width, m.depth)  # noqa: E731
    feasible = {key(m): m for m in space}
    scored: dict[tuple, dict] = {}
    population = rng.sample(space, min(cfg.search_population, len(space)))
    for _ in range(cfg.search_generations + 1):
        for m in population:
            if key(m) not in scored:
                scored[key(m)] = score(ctx, m, x, t_rel, t_sem)
        population.sort(key=lambda m: -scored[key(m)]["score"])
        parents = population[: max(1, len(population) // 2)]
        children, tries = [], 0
        while len(parents) + len(children) < min(cfg.search_population, len(space)) and tries < 200:
            tries += 1
            child = feasible.get(key(mutate(rng.choice(parents), rng, sorted(WIDTHS) if len(ctx.ex.input_shape) == 3 else ["mlp"])))
            if child is not None and key(child) not in {key(p) for p in parents + children}:
                children.append(child)
        population = parents + children
    ranking = sorted(scored.values(), key=lambda r: -r["score"])
    return {"budget": budget, "space": len(space), "evaluated": len(ranking), "ranking": ranking, "winner": ranking[0]}


def student_search(ctx: Context) -> Trained:
    from stages.classifier.methods import METHODS

    cfg = ctx.cfg
    if cfg.search_method not in METHODS or cfg.search_method == "student-search":
        raise DistilError(f"search_method must be a classifier method that trains one student, got '{cfg.search_method}'")
    method = METHODS[cfg.search_method]
    if method.teacher == "many":
        raise DistilError(f"search_method '{cfg.search_method}' needs several teachers; student-search trains with one")
    path = ctx.work / "search.json"
    if path.is_file():  # a resumed run trains the winner it chose before
        found = json.loads(path.read_text())
    else:
        t0 = time.perf_counter()
        found = {**search(ctx), "search_seconds": time.perf_counter() - t0}
        write_json(path, found)
    w = found["winner"]
    winner = replace(cfg.model, arch=w["arch"], width=w["width"], depth=w["depth"])
    trained = method.train(replace(ctx, cfg=replace(cfg, model=winner)))
    summary = {**trained.summary, "search": {k: v for k, v in found.items() if k != "ranking"}, "search_method": cfg.search_method,
               "search_cost_share": found["search_seconds"] / max(trained.summary.get("train_seconds", 0.0), 1e-9)}  # fmt: skip
    return Trained(trained.model, summary, trained.extra_models, model_cfg=winner)
