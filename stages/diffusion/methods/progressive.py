"""``distill --method progressive``: progressive distillation of a diffusion teacher.

Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2): in rounds, a student initialised from its teacher learns to take in one
DDIM step what the teacher takes in two; it then becomes the next round's teacher, so
the step count halves each round, from N = ``diffusion.teacher_steps`` down to
``diffusion.target_steps`` (N / target a power of two). A round with a student of n steps:

1. x from the data; a student step j ~ U{0..n-1} from t = t_j to t'' = t_{j+1} on the
   trailing grid of n steps (``sampling.ode_timesteps``; t_n = -1 is the clean end), and
   the teacher's midpoint t' (its grid of 2n steps holds both: the grids nest);
2. z_t = alpha_t x + sigma_t eps; two teacher DDIM steps z_t -> z_t' -> z_t'';
3. the target is the x that one DDIM step from z_t would need to land on z_t'':
   x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
   (x~ = z_t'' at the clean end);
4. loss w(t) ||x~ - x_hat(z_t)||^2 with x_hat the student's output read by the teacher's
   prediction type and w = max(alpha_t^2 / sigma_t^2, 1), the "truncated SNR" weighting
   of their section 4.

Every round trains for ``steps`` optimiser steps (or ``epochs``) with its own cosine
learning rate, as the paper trains every halving for a fixed number of updates, and
keeps the EMA of its weights (``diffusion.ema``) as the next teacher. Each round
checkpoints under ``checkpoint/round-<r>``, so a killed run resumes in its round. The final
student is saved with a ``DDIMScheduler``: ``target_steps`` DDIM steps sample it
(``sampling.sample_generator`` or diffusers' ``set_timesteps(target_steps)``).
"""

from __future__ import annotations

import copy
import math

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.sampling import ode_step, ode_timesteps
from stages.diffusion.schedule import bcast
from stages.diffusion.students import Probe, check_probe, ddim_scheduler, load_teacher, net
from stages.diffusion.training import EMA, fit
from stages.errors import DistilError


def rounds(teacher_steps: int, target_steps: int, T: int) -> list[int]:
    """The students' step counts, one per round: teacher_steps / 2, ..., target_steps."""
    if target_steps < 1 or teacher_steps <= target_steps or teacher_steps > T:
        raise DistilError(
            f"progressive needs 1 <= diffusion.target_steps < teacher_steps <= the teacher's {T} timesteps, "
            f"got target_steps {target_steps} and teacher_steps {teacher_steps}"
        )
    ratio = teacher_steps // target_steps
    if teacher_steps % target_steps or ratio & (ratio - 1):
        raise DistilError(
            f"progressive halves the steps each round: teacher_steps / target_steps must be a power of two, "
            f"got {teacher_steps} / {target_steps}"
        )
    return [teacher_steps >> r for r in range(1, int(math.log2(ratio)) + 1)]


def round_loss(teacher, schedule, n: int):
    """The loss of a round whose student takes n steps (module docstring, steps 1-4)."""
    fine = ode_timesteps(schedule.T, 2 * n)
    starts = torch.tensor(fine[0::2])
    mids = torch.tensor(fine[1::2])
    ends = torch.tensor([*fine[2::2], -1])

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        j = torch.randint(0, n, (len(x0),), generator=g)
        t, tm, te = starts[j], mids[j], ends[j]
        z_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), t)
        a_t, s_t = (bcast(v, x0).to(x0.device) for v in schedule.alpha_sigma(t))
        a_e, s_e = (bcast(v, x0).to(x0.device) for v in schedule.alpha_sigma(te))
        with torch.no_grad():
            z_e = ode_step(teacher, schedule, ode_step(teacher, schedule, z_t, t, tm, "ddim"), tm, te, "ddim")
            ratio = s_e / s_t
            x_target = (z_e.double() - ratio * z_t.double()) / (a_e - ratio * a_t)
        x_hat, _ = schedule.x0_eps(model(z_t, t.to(x0.device)).sample, z_t, t)
        w = (a_t**2 / s_t**2).clamp_min(1).flatten()
        return torch.mean(w * ((x_hat - x_target) ** 2).flatten(1).mean(1)).float()

    return loss


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(final student, its DDIMScheduler, summary)."""
    teacher = load_teacher(teacher_path, data, device, "progressive")
    schedule, d = teacher.schedule, cfg.diffusion
    check_probe(cfg)
    plan = rounds(d.teacher_steps, d.target_steps, schedule.T)
    probe = Probe(teacher, cfg, device)
    train_rows = data.split("train")
    current, rows = teacher.model, []
    for r, n in enumerate(plan):
        student = copy.deepcopy(current).requires_grad_(True)
        ema = EMA(student, d.ema, warmup=True)

        def paired_error(epoch: int | None = None, n=n, ema=ema) -> dict[str, float]:
            return {"paired_error": probe(probe.ddim(net(ema.model), n)), "student_steps": n}

        before = probe(probe.ddim(net(current), 2 * n))
        progress = fit(student, ema, train_rows, cfg, work / "checkpoint" / f"round-{r}", round_loss(net(current), schedule, n),
                       device=device, label=f"progressive {2 * n}->{n}", bar=bar, live=live, on_epoch=paired_error)  # fmt: skip
        current = ema.model.requires_grad_(False)
        history = progress["history"]
        rows.append({"round": r + 1, "student_steps": n, "teacher_paired_error": before,
                     "paired_error": history[-1]["paired_error"] if history else before,
                     "original_teacher_paired_error": probe.teacher_error(n), "epochs": progress["epoch"],
                     "train_seconds": progress["seconds"], "history": history})  # fmt: skip
    summary = {
        "teacher": teacher.identity(), "teacher_steps": d.teacher_steps, "target_steps": d.target_steps,
        "sampling_steps": d.target_steps, "rounds": len(plan), "ema": d.ema,
        "train_seconds": sum(row["train_seconds"] for row in rows), "paired_error_final": rows[-1]["paired_error"],
        f"paired_error_teacher_{d.target_steps}step": rows[-1]["original_teacher_paired_error"],
        "paired_error_reference_steps": d.eval_steps, "history": rows,
    }  # fmt: skip
    return current, ddim_scheduler(teacher.scheduler), summary
