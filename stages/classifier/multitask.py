"""Multi-task students with gates over experts (``distill --method multi-gate``).

**Tasks** come from the label: ``label`` is the data's own classes; on 10-class digits the
derived tasks ``parity`` (odd), ``high`` (>= 5), ``round`` (0, 6, 8, 9: closed loops) and
``prime`` (2, 3, 5, 7) are each a fixed map of the digit (``task_map``: a [classes, task
classes] 0/1 matrix), so every table and teacher of the digits task serves them: a task's
label is the map of the row's label, a teacher's task distribution the sum of its class
probabilities over each task class.

**Students** (``GatedMultiTask``, ``kind``): one head per task over

- ``shared-bottom``: one shared layer (the dense multi-task baseline: every task reads the same
  features);
- ``home`` (HoME, Wang et al. 2024, "Hierarchy of Multi-Gate Experts for Multi-Task Learning at
  Kuaishou"): shared experts plus ``task_experts`` experts of each task's own, a per-task gate
  (softmax over the shared and its own experts) and HoME's expert normalisation (each expert's
  output layer-normalised before its activation, against the expert collapse the paper
  measures: experts with most activations zero get no fair gate weight). Its hierarchy of
  meta-task gates and its feature- and self-gates are left out: with a handful of tasks there
  is no task grouping to learn;
- ``gmope`` (GMoPE, "A Prompt-Expert Mixture Framework for Graph Foundation Models"): expert e is
  one shared layer applied to the input plus the expert's prompt vector p_e; per-task gates
  mix them; the soft orthogonality penalty sum over e != e' of cos(p_e, p_e')^2 keeps the
  prompts, so the experts, apart (``orthogonality``);
- ``flexmore`` (FlexMoRE, "A Flexible Mixture of Rank-heterogeneous Experts"): one shared
  layer W plus one low-rank adapter per expert, of its own rank (``ranks``: expert e computes
  (W + B_e A_e) x, B_e starting at zero as in LoRA); per-task gates mix them.

``top_k`` > 0 keeps each row's k largest gate weights (sparse routing, ``sparse``).

``forward`` is the first task's logits, so ``evaluate``, ``cascade`` and ``serve`` use the model
as a classifier of the data's labels; ``task_report`` adds each task's accuracy and how much
weight each task's gate gives each expert (utilisation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.classifier.scaling import Standardize
from stages.errors import DistilError

KINDS = ("shared-bottom", "home", "gmope", "flexmore")
DERIVED: dict[str, tuple[set[int], list[str]]] = {
    "parity": ({1, 3, 5, 7, 9}, ["even", "odd"]),
    "high": ({5, 6, 7, 8, 9}, ["low", "high"]),
    "round": ({0, 6, 8, 9}, ["open", "round"]),
    "prime": ({2, 3, 5, 7}, ["not prime", "prime"]),
}
"""Derived digit tasks: the digits of task class 1, and the names of classes 0 and 1."""


def task_map(task: str, num_classes: int) -> torch.Tensor:
    """[num_classes, task classes] with a 1 where a class belongs to a task class."""
    if task == "label":
        return torch.eye(num_classes)
    if task not in DERIVED:
        raise DistilError(f"unknown task '{task}' in mt_tasks; choose label or {', '.join(DERIVED)}")
    if num_classes != 10:
        raise DistilError(f"task '{task}' is a map of the 10 digits; this data has {num_classes} classes: use mt_tasks=[label]")
    ones, _ = DERIVED[task]
    m = torch.zeros(10, 2)
    for c in range(10):
        m[c, int(c in ones)] = 1.0
    return m


class Expert(nn.Module):
    """Linear, layer norm (HoME's expert normalisation), SiLU."""

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.linear, self.norm = nn.Linear(d_in, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.linear(x) if extra is None else self.linear(x) + extra
        return nn.functional.silu(self.norm(h))


def sparse(w: torch.Tensor, k: int) -> torch.Tensor:
    """Gate probabilities kept on each row's ``k`` largest, the rest 0 (0: all of them). Not
    renormalised, as in the Switch Transformer, so top-1 routing still trains the gate through
    the chosen expert's weight. An expert off a row's top-k gets no gradient from it: with top-1
    routing a task trains only the experts it picks, the condition of the continual-learning
    theory (Li et al. 2024)."""
    if k <= 0 or k >= w.shape[-1]:
        return w
    top, idx = w.topk(k, dim=-1)
    return torch.zeros_like(w).scatter(-1, idx, top)


class GatedMultiTask(nn.Module):
    """One head per task over gated experts (or one shared layer); see the module docstring."""

    def __init__(self, kind: str, tasks: list[str], d_in: int, width: int, num_classes: int, *, experts: int = 4,
                 task_experts: int = 1, ranks: list[int] | None = None, top_k: int = 0, standardize: bool = False):  # fmt: skip
        super().__init__()
        if kind not in KINDS:
            raise DistilError(f"unknown mt_kind '{kind}'; choose one of {', '.join(KINDS)}")
        if not tasks or tasks[0] != "label" or len(set(tasks)) != len(tasks):
            raise DistilError(f"mt_tasks must start with label and name each task once, got {tasks}")
        ranks = list(ranks or [])
        if kind == "flexmore" and (not ranks or min(ranks) < 1):
            raise DistilError(f"flexmore needs one positive rank per expert in mt_ranks, got {ranks}")
        self.spec = {"kind": kind, "tasks": list(tasks), "width": width, "experts": experts, "task_experts": task_experts,
                     "ranks": ranks, "top_k": top_k}  # fmt: skip
        self.kind, self.tasks, self.num_classes, self.feature_dim = kind, list(tasks), num_classes, width
        self.experts, self.aux_head = 1, None  # a plain classifier of the first task to the other commands
        self.scaler = Standardize(d_in) if standardize else None
        for i, t in enumerate(tasks):
            self.register_buffer(f"map{i}", task_map(t, num_classes))
        self.heads = nn.ModuleList(nn.Linear(width, self.task_map(i).shape[1]) for i in range(len(tasks)))
        n = len(tasks)
        if kind == "shared-bottom":
            self.bottom = Expert(d_in, width)
        elif kind == "home":
            self.shared = nn.ModuleList(Expert(d_in, width) for _ in range(experts))
            self.own = nn.ModuleList(nn.ModuleList(Expert(d_in, width) for _ in range(task_experts)) for _ in range(n))
        elif kind == "gmope":
            self.backbone = Expert(d_in, width)
            self.prompts = nn.Parameter(0.1 * torch.randn(experts, d_in))
        else:
            self.base = Expert(d_in, width)
            self.down = nn.ParameterList(nn.Parameter(torch.randn(r, d_in) / d_in**0.5) for r in ranks)
            self.up = nn.ParameterList(nn.Parameter(torch.zeros(width, r)) for r in ranks)
        if kind != "shared-bottom":
            self.gates = nn.ModuleList(nn.Linear(d_in, self.gate_size()) for _ in range(n))

    def task_map(self, i: int) -> torch.Tensor:
        return getattr(self, f"map{i}")

    def shared_experts(self) -> int:
        """Experts every task's gate can pick (the first of each gate's outputs)."""
        return 0 if self.kind == "shared-bottom" else self.gate_size() - (self.spec["task_experts"] if self.kind == "home" else 0)

    def gate_size(self) -> int:
        return {"home": len(getattr(self, "shared", [])) + self.spec["task_experts"], "gmope": self.spec["experts"],
                "flexmore": len(self.spec["ranks"])}[self.kind]  # fmt: skip

    def _outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's output [N, width] (flexmore, gmope: shared by every task)."""
        if self.kind == "gmope":
            return [self.backbone(x + p) for p in self.prompts]
        base = self.base.linear(x)
        return [nn.functional.silu(self.base.norm(base + x @ a.T @ b.T)) for a, b in zip(self.down, self.up, strict=True)]

    def task_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """(each task's logits, each task's gate probabilities over its experts [N, E], before any
        top-k, or None). Every kind's experts come first in that order, home's own ones after."""
        x = x.flatten(1)
        x = self.scaler(x) if self.scaler is not None else x
        if self.kind == "shared-bottom":
            h = self.bottom(x)
            return [head(h) for head in self.heads], [None] * len(self.heads)
        shared = self._outputs(x) if self.kind != "home" else [e(x) for e in self.shared]
        logits, weights = [], []
        for i, head in enumerate(self.heads):
            outs = shared + ([e(x) for e in self.own[i]] if self.kind == "home" else [])
            w = torch.softmax(self.gates[i](x), dim=-1)
            mix = sparse(w, self.spec["top_k"])
            logits.append(head((torch.stack(outs, dim=1) * mix[..., None]).sum(dim=1)))
            weights.append(w)
        return logits, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_outputs(x)[0][0]

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[:, None]

    def orthogonality(self) -> torch.Tensor:
        """GMoPE's soft orthogonality of the prompts: sum over e != e' of cos(p_e, p_e')^2 (0 otherwise)."""
        if self.kind != "gmope":
            return torch.zeros(())
        p = nn.functional.normalize(self.prompts, dim=-1)
        gram = p @ p.T
        return (gram - torch.diag(torch.diag(gram))).square().sum()


def build_multitask(spec: dict[str, Any], input_shape: list[int], num_classes: int, standardize: bool) -> GatedMultiTask:
    import math

    return GatedMultiTask(spec["kind"], spec["tasks"], math.prod(input_shape), spec["width"], num_classes,
                          experts=spec["experts"], task_experts=spec["task_experts"], ranks=spec["ranks"],
                          top_k=spec.get("top_k", 0), standardize=standardize)  # fmt: skip


def task_labels(model: GatedMultiTask, i: int, y: torch.Tensor) -> torch.Tensor:
    return model.task_map(i).to(y.device)[y].argmax(-1)


class TaskReport:
    """Per-task accuracy and per-task mean gate weights, accumulated over batches."""

    def __init__(self, model: GatedMultiTask):
        self.model, self.rows = model, 0
        self.correct = [0] * len(model.tasks)
        self.gate_sums: list[torch.Tensor | None] = [None] * len(model.tasks)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        logits, weights = self.model.task_outputs(x)
        y = y.to(x.device)
        for i, (z, w) in enumerate(zip(logits, weights, strict=True)):
            self.correct[i] += int((z.argmax(-1) == task_labels(self.model, i, y)).sum())
            if w is not None:
                s = sparse(w, self.model.spec["top_k"]).sum(0).cpu()  # the weight each expert's output gets
                self.gate_sums[i] = s if self.gate_sums[i] is None else self.gate_sums[i] + s
        self.rows += len(y)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"task_{t}_accuracy": c / max(self.rows, 1) for t, c in zip(self.model.tasks, self.correct, strict=True)}
        if self.gate_sums[0] is not None:
            out["expert_utilisation"] = {t: [round(float(v) / max(self.rows, 1), 4) for v in s]
                                         for t, s in zip(self.model.tasks, self.gate_sums, strict=True)}  # fmt: skip
        return out
