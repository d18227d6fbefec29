"""``distill --method multistep``: a multistep consistency student of a diffusion teacher.

Multistep consistency distillation (Heek, Hoogeboom & Salimans 2024, "Multistep
Consistency Models"; its latent form MLCM, Xie et al. 2024, "MLCM: Multistep Consistency
Distillation of Latent Diffusion Model") and Hyper-SD's trajectory segmented consistency
distillation (Ren et al. 2024, "Hyper-SD", section 3.1, TSCD): the time axis is cut
into s = ``diffusion.segments`` segments at the teacher's trailing grid of s steps,
e_0 = -1 < e_1 < ... < e_s = T - 1 (``sampling.ode_timesteps``), and the student is a
consistency model *within* each segment, mapping any x_t with t in (e_j, e_{j+1}] to the
trajectory's point at the segment's start e_j:

    f(x_t, t) = DDIM(x_t, t -> e_j) = alpha_{e_j} x0_hat + sigma_{e_j} eps_hat,

with (x0_hat, eps_hat) read from the student's output by the teacher's prediction type
(Heek et al.'s DDIM parameterisation of the segment map; DDIM from e_j to e_j is the
identity, so f(x, e_j) = x holds exactly: the boundary condition at each segment's start). Training, as consistency distillation restricted
to one segment:

1. x_0 from the data; a point t of the skip-k grid inside a segment, t in
   {e_j + k, e_j + 2k, ...} plus the segment's end e_{j+1}; s = max(t - k, e_j);
2. x_t = alpha_t x_0 + sigma_t eps; one teacher ODE step (``diffusion.solver``) gives x_s;
3. loss d(f_theta(x_t, t), f_theta^-(x_s, s)) with f_theta^-(x_s, e_j) = x_s (the
   segment's start: the teacher's step itself is the target), d = l2 or pseudo-Huber;
4. theta^- <- mu theta^- + (1 - mu) theta (``target_ema``).

Sampling is deterministic, s DDIM steps of the student along the segment boundaries
e_s -> e_{s-1} -> ... -> -1: exactly diffusers' ``DDIMScheduler`` (trailing spacing, eta 0)
with ``set_timesteps(s)``, which the student is saved with. With s = 1 this is consistency
distillation in the DDIM parameterisation. Hyper-SD lowers the segment count stage by
stage (8 -> 4 -> 2 -> 1) and keeps a model per step count; here one run trains one
segment count, so a 1-2-4-step table takes three runs (segments 1, 2, 4). Sampled with
fewer steps than segments, the student skips boundaries it was not trained to jump.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.sampling import ode_step, ode_timesteps
from stages.diffusion.students import Probe, averages, check_student, ddim_scheduler, init_student, load_teacher, net
from stages.diffusion.training import fit
from stages.errors import DistilError
from stages.losses.consistency import CONSISTENCY_LOSSES


def segment_grid(T: int, segments: int, k: int) -> tuple[list[int], torch.Tensor]:
    """(boundaries e_0 = -1 < ... < e_s = T - 1, training triples [n, 3] of (t, s, e_j)):
    every point t of the skip-k grid in each segment (and the segment's end), the
    solver step's end s = max(t - k, e_j), and the segment's start e_j."""
    if segments < 1 or segments > T:
        raise DistilError(f"diffusion.segments must be between 1 and the teacher's {T} timesteps, got {segments}")
    if k < 1:
        raise DistilError(f"diffusion.skip must be >= 1, got {k}")
    bounds = [-1, *reversed(ode_timesteps(T, segments))]
    triples = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        points = sorted({*range(lo + k, hi, k), hi})
        triples += [(t, max(t - k, lo), lo) for t in points]
    return bounds, torch.tensor(triples, dtype=torch.long)


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live, method: str = "multistep",
          make_student=None):  # fmt: skip
    """(student to save, its DDIMScheduler, summary). ``make_student(teacher, bounds)`` builds the
    student network instead of ``init_student`` (``dual-expert``: one network per half of the segments)."""
    teacher = load_teacher(teacher_path, data, device, method)
    schedule, d = teacher.schedule, cfg.diffusion
    check_student(cfg)
    bounds, triples = segment_grid(schedule.T, d.segments, d.skip)
    student = make_student(teacher, bounds) if make_student else init_student(cfg, teacher, data, device)
    target, sampler = averages(cfg, student)
    saved = sampler or target
    distance = CONSISTENCY_LOSSES[d.loss]

    def f(model, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return ode_step(net(model), schedule, x, t, e, "ddim")

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t, s, e = triples[torch.randint(0, len(triples), (len(x0),), generator=g)].unbind(1)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), t)
        with torch.no_grad():
            x_s = ode_step(teacher.denoise, schedule, x_t, t, s, d.solver)
            at_start = (s == e).reshape(-1, *[1] * (x0.ndim - 1)).to(x0.device)
            y = torch.where(at_start, x_s, f(target.model, x_s, s.clamp_min(0), e))
        return distance(f(model, x_t, t, e), y, d.huber_c)

    probe = Probe(teacher, cfg, device)

    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": probe(probe.ddim(net(saved.model), d.segments))}

    initial = paired_error()["paired_error"]
    progress = fit(student, target, data.split("train"), cfg, work, loss, device=device, label=method,
                   bar=bar, live=live, on_epoch=paired_error, sampler=sampler)  # fmt: skip
    history = progress["history"]
    summary = {
        "teacher": teacher.identity(), "segments": d.segments, "boundaries": bounds, "skip": d.skip,
        "sampling_steps": d.segments, "solver": d.solver, "loss": d.loss, "target_ema": d.target_ema, "sample_ema": d.sample_ema,
        "student_init": d.student_init, "epochs": progress["epoch"], "train_seconds": progress["seconds"],
        "paired_error_initial": initial, "paired_error_final": history[-1]["paired_error"] if history else initial,
        f"paired_error_teacher_{d.segments}step": probe.teacher_error(d.segments),
        "paired_error_reference_steps": d.eval_steps, "history": history,
    }  # fmt: skip
    return saved.model, ddim_scheduler(teacher.scheduler), summary
