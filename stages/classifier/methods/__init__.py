"""Classifier distillation methods and the one explicit name -> method table.

A method is a function ``train(ctx) -> Trained``: it builds its model(s) from the
context, trains them with ``stages.classifier.training.fit`` and returns the model to save. What a
method needs from its inputs is declared here, so ``distill`` validates before training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stages.classifier.methods import (
    competitive,
    dataset,
    experts,
    intermediate,
    logit,
    meta_dmoe,
    multi_gate,
    representation,
    search,
    self_distill,
)
from stages.classifier.methods.common import Trained
from stages.classifier.training import Context


@dataclass(frozen=True)
class Method:
    help: str
    train: Callable[[Context], Trained]
    teacher: str = "none"
    """'none'; 'one' (stored logits or one live --teacher); 'many' (several live --teacher)."""
    label_free: bool = False
    """Trains on every train row, labelled or not (see distill.labeled_fraction)."""
    live: bool = False
    """Runs the teachers themselves (their features, or trains them): live --teacher models only, not stored logits."""
    teachers: int = 0
    """Exactly this many --teacher (0: as ``teacher`` says)."""


METHODS: dict[str, Method] = {
    "ce": Method("cross-entropy on gold labels (trains teachers and baselines; needs no teacher data)", logit.ce),
    "kd": Method("Hinton KD: T^2 KL(p_t || p_s) mixed with CE", logit.divergence("kd"), "one"),
    "reverse-kl": Method("reverse KL(p_s || p_t), mode seeking", logit.divergence("reverse-kl"), "one"),
    "jsd": Method("generalised Jensen-Shannon divergence with beta (GKD)", logit.divergence("jsd"), "one"),
    "skew-kl": Method("skew KL of DistiLLM (reverse_skew for the reverse variant)", logit.divergence("skew-kl"), "one"),
    "tvd": Method("total variation distance", logit.divergence("tvd"), "one"),
    "pld": Method("Plackett-Luce list-wise distillation: gold first, then the teacher's ranking", logit.pld, "one"),
    "ssld": Method("label-free symmetric KL to the teacher; uses unlabelled rows too", logit.ssld, "one", label_free=True),
    "pskd": Method("progressive self-KD: targets mix one-hot and the model's own previous-epoch predictions", self_distill.pskd),
    "self-distill": Method(
        "iterative self-distillation over `generations`; gold weight fixed or closed-form", self_distill.iterate
    ),
    "anchored": Method(
        "recursive distillation anchored to the base teacher; records KL to it per round", self_distill.anchored, "one"
    ),
    "random-teacher": Method(
        "distil a frozen random teacher (no labels), then a linear probe", representation.random_teacher, label_free=True
    ),
    "sla-sd": Method("self-supervised label augmentation (rotations) self-distilled into one pass", representation.sla_sd),
    "mdcs": Method("E experts: logit-adjusted diversity + consistency self-distillation (long tail)", experts.mdcs),
    "fitnet": Method(
        "FitNets hint: a learnt regressor of the student's features onto the live teacher's, MSE, beside KD + CE",
        intermediate.fitnet, "one", live=True,
    ),
    "mi-alpha": Method(
        "Distiller's MI-alpha: maximise the I_alpha bound on the mutual information of student and live-teacher "
        "features (cosine critic), beside KD + CE",
        intermediate.mi_alpha, "one", live=True,
    ),
    "hybrid": Method(
        "Hybrid Distillation: two --teacher with different inductive biases; the student imitates the first's sample "
        "relations and regresses the second's features, beside CE",
        intermediate.hybrid, "many", live=True, teachers=2,
    ),
    "competitive": Method(
        "CoMD's competitive distillation: rounds in which the student up-weights its hardest rows (largest KL to the "
        "teacher) and a copy of the live --teacher is fine-tuned on the rows only the student gets right",
        competitive.competitive, "one", live=True,
    ),
    "dataset-distill": Method(
        "dataset distillation: images_per_class synthetic rows per class learnt by matching smooth experts' training "
        "trajectories (MTT), written as a table under synthetic/ (dd_iterations=0: random real rows); the student trained on it",
        dataset.dataset_distill,
    ),
    "student-search": Method(
        "DisWOT: score candidate architectures within search_budget parameters by how much their random-init "
        "features' sample relations and class semantics resemble the live --teacher's, evolve them, train the winner "
        "with search_method (kd); the ranking in search.json",
        search.student_search, "one", live=True,
    ),
    "meta-dmoe": Method(
        "Meta-DMoE: one expert --teacher per source domain (data.domains), an aggregator of their features, the student "
        "meta-trained to adapt to them from unlabelled rows; with meta_target, adapted to that unseen domain (unadapted/ beside)",
        meta_dmoe.meta_dmoe, "many", live=True,
    ),
    "multi-gate": Method(
        "a multi-task student (mt_tasks: the label and maps of it) with per-task gates over experts: home, gmope, "
        "flexmore or the shared-bottom baseline (mt_kind); KD of every task from one teacher; mt_sequential: tasks in "
        "sequence, forgetting recorded",
        multi_gate.multi_gate, "one",
    ),
    "mst": Method("mixture of specialised teachers: a gate picks the top-k teachers per row", experts.mst, "many"),
}
