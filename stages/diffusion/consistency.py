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

The student starts from the teacher's weights (``student_init: teacher``, as CD and LCM
do) or from a fresh network. Each epoch it records the paired error
mean_z ||student_1step(z) - teacher_ODE(z)||_2 on a fixed batch of seeded noise (teacher:
``eval_steps`` DDIM steps, computed once); the student saved is theta^-, with an
``LCMScheduler`` config (``original_inference_steps`` = N) so diffusers samples it too.
"""

from __future__ import annotations

import copy
import inspect

import torch
from diffusers import LCMScheduler

from stages.config import DistillConfig
from stages.diffusion.generator import check_same_shape, load_generator
from stages.diffusion.models import build_denoiser, sample_shape_of
from stages.diffusion.sampling import SOLVERS, SampleNoise, consistency_fn, ode_sample, ode_step
from stages.diffusion.training import EMA, fit
from stages.errors import DistilError
from stages.losses.consistency import CONSISTENCY_LOSSES
from stages.tasks.generators import GeneratorData

EVAL_SEED = 1_000_000_007
"""Noise seeds of the paired-error batch: apart from the seeds samples are drawn from."""


def _check(cfg: DistillConfig, T: int) -> int:
    d = cfg.diffusion
    if d.solver not in SOLVERS:
        raise DistilError(f"unknown diffusion.solver '{d.solver}'; choose one of {', '.join(SOLVERS)}")
    if d.loss not in CONSISTENCY_LOSSES:
        raise DistilError(f"unknown diffusion.loss '{d.loss}'; choose one of {', '.join(CONSISTENCY_LOSSES)}")
    if d.student_init not in ("teacher", "fresh"):
        raise DistilError(f"diffusion.student_init must be teacher or fresh, got '{d.student_init}'")
    if d.skip < 1 or T % d.skip:
        raise DistilError(f"diffusion.skip must be >= 1 and divide the teacher's {T} timesteps, got {d.skip}")
    if d.eval_samples < 1 or d.eval_steps < 1:
        raise DistilError("diffusion.eval_samples and diffusion.eval_steps must be at least 1")
    if d.timestep_scaling <= 0:
        raise DistilError(f"diffusion.timestep_scaling must be positive, got {d.timestep_scaling}")
    return T // d.skip


def student_scheduler(teacher_scheduler, grid_points: int, timestep_scaling: float) -> LCMScheduler:
    """The student's ``LCMScheduler``: the teacher's betas and prediction type, the grid of
    ``grid_points`` timesteps it was distilled on, and the boundary scalings' timestep scaling."""
    keys = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    base = {k: v for k, v in teacher_scheduler.config.items() if k in keys}
    return LCMScheduler(**{**base, "original_inference_steps": grid_points, "timestep_scaling": timestep_scaling,
                           "clip_sample": False, "thresholding": False})  # fmt: skip


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(student to save, its LCMScheduler, summary)."""
    if teacher_path is None:
        raise DistilError("method 'consistency-distill' needs a diffusion teacher; pass --teacher DIR (from --method denoise)")
    teacher = load_generator(teacher_path, device, "teacher")
    if teacher.kind != "diffusion":
        raise DistilError(
            f"teacher {teacher_path} is a consistency model ({type(teacher.scheduler).__name__}); "
            "consistency-distill needs a diffusion teacher (distill --method denoise)"
        )
    schedule, d = teacher.schedule, cfg.diffusion
    N = _check(cfg, schedule.T)
    check_same_shape(teacher.sample_shape, data.sample_shape, f"teacher {teacher_path}", f"data {data.name}")
    if d.student_init == "teacher":
        student = copy.deepcopy(teacher.model).requires_grad_(True)
    else:
        student = build_denoiser(d, data.sample_shape, cfg.seed).to(device)
        check_same_shape(sample_shape_of(student), teacher.sample_shape, "the fresh student", f"teacher {teacher_path}")
    target = EMA(student, d.target_ema, warmup=False)
    scaling, k = d.timestep_scaling, d.skip
    grid = torch.arange(1, N + 1) * k - 1
    distance = CONSISTENCY_LOSSES[d.loss]

    def net(m):
        return lambda x, t: m(x, t.to(x.device)).sample

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = grid[torch.randint(0, N, (len(x0),), generator=g)]
        s = t - k
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), t)
        with torch.no_grad():
            x_s = ode_step(teacher.denoise, schedule, x_t, t, s, d.solver)
            y = consistency_fn(net(target.model), schedule, x_s, s.clamp_min(0), scaling)
        return distance(consistency_fn(net(model), schedule, x_t, t, scaling), y, d.huber_c)

    z = SampleNoise(range(EVAL_SEED, EVAL_SEED + d.eval_samples), data.sample_shape).draw().to(device)
    top = torch.full((len(z),), int(grid[-1]), dtype=torch.long)
    with torch.no_grad():
        reference = ode_sample(teacher.denoise, schedule, z, d.eval_steps, "ddim")
        teacher_1step = ode_sample(teacher.denoise, schedule, z, 1, "ddim")

    def paired(x: torch.Tensor) -> float:
        return float((x - reference).flatten(1).norm(dim=1).mean())

    @torch.no_grad()
    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": paired(consistency_fn(net(target.model), schedule, z, top, scaling))}

    initial = paired_error()["paired_error"]
    progress = fit(student, target, data.split("train"), cfg, work, loss, device=device, label="consistency-distill",
                   bar=bar, live=live, on_epoch=paired_error)  # fmt: skip
    scheduler = student_scheduler(teacher.scheduler, N, scaling)
    history = progress["history"]
    summary = {
        "teacher": teacher.identity(), "skip": k, "grid_points": N, "solver": d.solver, "loss": d.loss,
        "target_ema": d.target_ema, "student_init": d.student_init, "epochs": progress["epoch"],
        "train_seconds": progress["seconds"], "paired_error_initial": initial,
        "paired_error_final": history[-1]["paired_error"] if history else initial,
        "paired_error_teacher_1step": paired(teacher_1step), "paired_error_reference_steps": d.eval_steps,
        "history": history,
    }  # fmt: skip
    return target.model, scheduler, summary
