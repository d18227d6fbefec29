"""``distill --method multi-gate``: a multi-task student with gates over experts, distilled from
one teacher of the data's labels (``stages.classifier.multitask``: the tasks, the students).

Each task t is trained with (1 - alpha) CE on its label plus alpha T^2 KL(q_t || p_t), where q_t
is the teacher's distribution at temperature T summed over each task class (the tasks are maps
of the label, so one teacher of the digits supervises all of them); gmope adds its prompts'
orthogonality penalty. The mean over tasks is the loss.

With ``mt_sequential`` the tasks arrive one after the other (continual learning; "Theory on
Mixture-of-Experts in Continual Learning", Li et al. 2024): ``epochs`` on the first task alone,
then on the second alone, and so on; a task's head and gate are trained only in its own phase.
After each phase every task seen so far is scored on the dev split, which gives the accuracy
matrix and the forgetting of each earlier task (its best accuracy in a phase before the last
minus its accuracy at the end, averaged over the tasks before the last: Chaudhry et al. 2018's
measure). The theory's point is that experts specialise to tasks and, with sparse routing and
a load-balancing term, later tasks go to other experts and stop overwriting earlier ones; a
shared-bottom student has nothing to protect them. Here each phase's loss adds ``mt_balance``
times the current gate's probability of each shared expert, weighted by how much the earlier
tasks' gates used it (their mean over the train rows): a new task is pushed to experts the old
ones do not need; ``mt_top_k`` = 1 gives the theory's top-1 routing. A new task first trains its
gate and head alone for one epoch (the experts fixed), so its first batches do not write into
the experts an untrained gate would send them to.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from stages.classifier.methods.common import Trained, teacher_logits
from stages.classifier.multitask import GatedMultiTask, TaskReport, task_labels
from stages.classifier.training import Context, fit
from stages.losses import cross_entropy
from stages.losses.logits import forward_kl


def _build(ctx: Context) -> GatedMultiTask:
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed * 1009)
    model = GatedMultiTask(cfg.mt_kind, list(cfg.mt_tasks), math.prod(ctx.ex.input_shape), cfg.model.width, ctx.ex.num_classes,
                           experts=cfg.mt_experts, task_experts=cfg.mt_task_experts, ranks=list(cfg.mt_ranks), top_k=cfg.mt_top_k,
                           standardize=ctx.scaler is not None)  # fmt: skip
    if ctx.scaler is not None:
        model.scaler.load_state_dict(ctx.scaler.state_dict())
    return model.to(ctx.device)


def _loss(ctx: Context, tasks: list[int], used: torch.Tensor | None = None):
    """The tasks' mean KD + CE; with ``used`` (the earlier tasks' mean gate probability of each
    shared expert, sequential phases) plus ``mt_balance`` times the current gate's probability
    of those experts weighted by it."""
    cfg, T = ctx.cfg, ctx.cfg.temperature

    def loss(m: GatedMultiTask, b):
        logits, gates = m.task_outputs(b["x"])
        q = torch.softmax(teacher_logits(ctx, b).float() / T, dim=-1)
        terms = []
        for i in tasks:
            target = T * (q @ m.task_map(i)).clamp_min(1e-12).log()  # logits whose softmax at T is q summed per task class
            y = task_labels(m, i, b["y"])
            kd = forward_kl(logits[i], target, temperature=T, weight=b["w"])
            terms.append((1 - cfg.alpha) * cross_entropy(logits[i], y, weight=b["w"]) + cfg.alpha * kd)
        total = torch.stack(terms).mean() + cfg.mt_orthogonality * m.orthogonality().to(b["x"].device)
        if used is not None and gates[tasks[0]] is not None:
            share = gates[tasks[0]][:, : len(used)].mean(0)
            total = total + cfg.mt_balance * (share * used.to(share.device)).sum()
        return total

    return loss


def _dev_report(ctx: Context, model: GatedMultiTask) -> dict[str, Any]:
    report = TaskReport(model)
    was = model.training
    model.eval()
    for x, y in zip(ctx.dev["x"].split(1024), ctx.dev["y"].split(1024), strict=True):
        report.add(x.to(ctx.device), y)
    model.train(was)
    return report.metrics()


def _phase(ctx: Context, model: GatedMultiTask, i: int) -> tuple[Context, Any]:
    """The context whose dev labels are task ``i``'s (so ``fit`` selects on that task), and its predictor."""
    dev = {**ctx.dev, "y": task_labels(model, i, ctx.dev["y"].to(ctx.device)).cpu()}
    return replace(ctx, dev=dev), lambda m, x: m.task_outputs(x)[0][i]


def _train_usage(ctx: Context, model: GatedMultiTask, i: int) -> torch.Tensor:
    """Task ``i``'s mean gate probability of each shared expert over the train rows."""
    gates = ctx.logits(model, ctx.train["x"], fn=lambda m, x: m.task_outputs(x)[1][i][:, : m.shared_experts()]
                       if m.kind != "shared-bottom" else x[:, :0])  # fmt: skip
    return gates.mean(0) if len(gates) else torch.zeros(0)


def forgetting(matrix: list[list[float]]) -> list[float]:
    """Per task before the last: its best accuracy after any phase before the last, minus its
    accuracy after the last phase (``matrix[phase][task]``, tasks up to the phase)."""
    last = matrix[-1]
    return [max(row[t] for row in matrix[t:-1]) - last[t] for t in range(len(matrix) - 1)]


def multi_gate(ctx: Context) -> Trained:
    cfg = ctx.cfg
    model = _build(ctx)
    tasks = list(range(len(model.tasks)))
    if not cfg.mt_sequential:
        summary = fit(ctx, model, _loss(ctx, tasks))
        return Trained(model, {**summary, "mt_kind": cfg.mt_kind, "dev_tasks": _dev_report(ctx, model)})
    matrix, phases, used = [], [], torch.zeros(model.shared_experts())
    for i in tasks:
        phase, predict = _phase(ctx, model, i)
        loss = _loss(ctx, [i], used / max(i, 1) if i else None)
        if i and model.kind != "shared-bottom":  # route first: the new gate (and head) alone, the experts as they are
            fit(phase, model, loss, tag=f"route{i}", epochs=1, params=[*model.gates[i].parameters(), *model.heads[i].parameters()],
                predict=predict, select_best=False)  # fmt: skip
        phases.append(fit(phase, model, loss, tag=f"task{i}", predict=predict))
        used += _train_usage(ctx, model, i)
        dev = _dev_report(ctx, model)
        matrix.append([dev[f"task_{model.tasks[t]}_accuracy"] for t in range(i + 1)])
    lost = forgetting(matrix)
    summary = {**phases[-1], "mt_kind": cfg.mt_kind, "dev_tasks": dev, "accuracy_matrix": matrix, "forgetting": lost,
               "mean_forgetting": sum(lost) / len(lost) if lost else 0.0}  # fmt: skip
    return Trained(model, summary)
