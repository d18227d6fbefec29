"""``distill --method consistency-distill``: a few-step student from a diffusion teacher.

Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) in the
latent-consistency form of Luo et al. 2023 ("Latent Consistency Models", Algorithm 1,
without guidance), with the skipping-step solver of LCM / MLCM:

1. x_0 from the data, a grid index n ~ U{0..N-1} on the grid t_n = (n + 1) k - 1
   (N = T / k points, k = ``diffusion.skip``), t = t_n, s = t - k (-1 = clean);
2. x_t = alpha_t x_0 + sigma_t eps;
3. one teacher ODE step (``diffusion.solver``, DDIM by default) gives x_s
   (Song et al., eq. 6 with Phi the teacher's probability-flow ODE);
4. loss d(f_theta(x_t, t), f_theta^-(x_s, s)) (eq. 7), d = l2 or pseudo-Huber, with
   f(x, t) = c_skip(t) x + c_out(t) x0_hat(F(x, t)) (LCM eq. 8-9, sigma_data 0.5,
   timestep scaling 10), so f(x, 0) = x;
5. theta^- <- mu theta^- + (1 - mu) theta after every step (mu = ``target_ema``, 0.95).

With a class-conditional teacher the student is class-conditional too: each row's teacher step
and both sides of the loss are of the row's own class (no guidance); the paired-error probe
samples the null class.

The student starts from the teacher's weights (``student_init: teacher``, as CD and LCM
do) or from a fresh network. Each epoch it records the paired error
mean_z ||student_1step(z) - teacher_ODE(z)||_2 on a fixed batch of seeded noise (teacher:
``eval_steps`` DDIM steps, computed once); the student saved is theta^-, with an
``LCMScheduler`` config (``original_inference_steps`` = N) so diffusers samples it too.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods.denoise import train_labels
from stages.diffusion.sampling import consistency_fn, ode_step
from stages.diffusion.students import Probe, averages, check_student, init_student, load_teacher, net, student_scheduler
from stages.diffusion.training import fit
from stages.errors import DistilError
from stages.losses.consistency import CONSISTENCY_LOSSES


def _grid_points(cfg: DistillConfig, T: int) -> int:
    d = cfg.diffusion
    check_student(cfg)
    if d.skip < 1 or T % d.skip:
        raise DistilError(f"diffusion.skip must be >= 1 and divide the teacher's {T} timesteps, got {d.skip}")
    return T // d.skip


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live, method: str = "consistency-distill",
          teacher_step=None):  # fmt: skip
    """(student to save, its LCMScheduler, summary). ``teacher_step(denoise, schedule, x_t, t, s, g)``
    replaces the teacher's ODE step (``scott``: a stochastic step)."""
    teacher = load_teacher(teacher_path, data, device, method)
    schedule, d = teacher.schedule, cfg.diffusion
    N = _grid_points(cfg, schedule.T)
    student = init_student(cfg, teacher, data, device)
    target, sampler = averages(cfg, student)
    saved = sampler or target
    scaling, k = d.timestep_scaling, d.skip
    grid = torch.arange(1, N + 1) * k - 1
    distance = CONSISTENCY_LOSSES[d.loss]

    def loss(model, x0: torch.Tensor, g: torch.Generator, y_cls: torch.Tensor | None = None) -> torch.Tensor:
        t = grid[torch.randint(0, N, (len(x0),), generator=g)]
        s = t - k
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), t)
        denoise = teacher.conditioned(y_cls).denoise  # a class-conditional teacher: each row's own class
        with torch.no_grad():
            x_s = (ode_step(denoise, schedule, x_t, t, s, d.solver) if teacher_step is None
                   else teacher_step(denoise, schedule, x_t, t, s, g))  # fmt: skip
            y = consistency_fn(net(target.model, y_cls), schedule, x_s, s.clamp_min(0), scaling)
        return distance(consistency_fn(net(model, y_cls), schedule, x_t, t, scaling), y, d.huber_c)

    probe = Probe(teacher, cfg, device)
    top = torch.full((len(probe.z),), int(grid[-1]), dtype=torch.long)

    @torch.no_grad()
    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": probe(consistency_fn(net(saved.model), schedule, probe.z, top, scaling))}

    initial = paired_error()["paired_error"]
    labels = train_labels(data, teacher.classes).get("train") if teacher.classes else None
    progress = fit(student, target, data.split("train"), cfg, work, loss, device=device, label=method,
                   bar=bar, live=live, on_epoch=paired_error, sampler=sampler, labels=labels)  # fmt: skip
    scheduler = student_scheduler(teacher.scheduler, N, scaling)
    history = progress["history"]
    summary = {
        "teacher": teacher.identity(), "skip": k, "grid_points": N, "solver": d.solver, "loss": d.loss,
        "target_ema": d.target_ema, "sample_ema": d.sample_ema, "student_init": d.student_init, "epochs": progress["epoch"],
        "train_seconds": progress["seconds"], "paired_error_initial": initial,
        "paired_error_final": history[-1]["paired_error"] if history else initial,
        "paired_error_teacher_1step": probe.teacher_error(1), "paired_error_reference_steps": d.eval_steps,
        "history": history,
    }  # fmt: skip
    return saved.model, scheduler, summary
