"""What the students of a diffusion teacher share: loading and checking the teacher, the
student's first weights, the student's diffusers scheduler, and the paired-error probe.

Used by ``consistency`` (CD / LCM), ``multistep``, ``trajectory`` and ``progressive``.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.generator import Generator, check_same_shape, load_generator
from stages.diffusion.models import build_denoiser, classes_of, sample_shape_of
from stages.diffusion.sampling import SOLVERS, Denoise, SampleNoise, ode_sample
from stages.diffusion.training import EMA
from stages.errors import DistilError, one_of
from stages.losses.consistency import CONSISTENCY_LOSSES

EVAL_SEED = 1_000_000_007
"""Noise seeds of the paired-error batch: apart from the seeds samples are drawn from."""


def net(model: torch.nn.Module, labels: torch.Tensor | None = None) -> Denoise:
    """The network as ``denoise(x, t)``: its raw output at per-row timesteps t [B] (of the rows'
    classes ``labels`` for a class-conditional network; without them, of its null class, which
    diffusers' class-conditional U-Net needs spelt out)."""
    if labels is not None:
        return lambda x, t: model(x, t.to(x.device), class_labels=labels.to(x.device)).sample
    null = classes_of(model)
    if null:
        return lambda x, t: model(x, t.to(x.device), class_labels=torch.full((len(x),), null, device=x.device)).sample
    return lambda x, t: model(x, t.to(x.device)).sample


def load_teacher(path: Path | None, data: GeneratorData, device, method: str, unconditional: bool = False) -> Generator:
    """The diffusion teacher at ``path``, checked against the data's sample shape (and, for a
    method that makes an unconditional generator, refused when class-conditional)."""
    if path is None:
        raise DistilError(f"method '{method}' needs a diffusion teacher; pass --teacher DIR (from --method denoise)")
    teacher = load_generator(path, device, "teacher")
    if teacher.kind != "diffusion":
        raise DistilError(
            f"teacher {path} is a {teacher.kind} model ({type(teacher.scheduler).__name__}); "
            f"{method} needs a diffusion teacher (distill --method denoise)"
        )
    check_same_shape(teacher.sample_shape, data.sample_shape, f"teacher {path}", f"data {data.name}")
    if unconditional and teacher.classes:
        raise DistilError(f"{method} trains an unconditional generator; teacher {path} is class-conditional")
    return teacher


def check_student(cfg: DistillConfig) -> None:
    """The knobs every consistency student of a teacher reads."""
    d = cfg.diffusion
    one_of("diffusion.solver", d.solver, SOLVERS)
    one_of("diffusion.loss", d.loss, CONSISTENCY_LOSSES)
    if d.student_init not in ("teacher", "fresh"):
        raise DistilError(f"diffusion.student_init must be teacher or fresh, got '{d.student_init}'")
    check_probe(cfg)
    if not 0 <= d.sample_ema < 1:
        raise DistilError(f"diffusion.sample_ema must be in [0, 1) (0 = save the target network), got {d.sample_ema}")
    if d.timestep_scaling <= 0:
        raise DistilError(f"diffusion.timestep_scaling must be positive, got {d.timestep_scaling}")


def check_probe(cfg: DistillConfig) -> None:
    if cfg.diffusion.eval_samples < 1 or cfg.diffusion.eval_steps < 1:
        raise DistilError("diffusion.eval_samples and diffusion.eval_steps must be at least 1")


def init_student(cfg: DistillConfig, teacher: Generator, data: GeneratorData, device) -> torch.nn.Module:
    """A trainable copy of the teacher (``student_init: teacher``, as CD, LCM and progressive
    distillation start) or a fresh network built from ``cfg.diffusion``."""
    if cfg.diffusion.student_init == "teacher":
        return copy.deepcopy(teacher.model).requires_grad_(True)
    student = build_denoiser(cfg.diffusion, data.sample_shape, cfg.seed, classes=teacher.classes).to(device)
    check_same_shape(sample_shape_of(student), teacher.sample_shape, "the fresh student", f"teacher {teacher.path}")
    return student


def averages(cfg: DistillConfig, student: torch.nn.Module) -> tuple[EMA, EMA | None]:
    """The target network theta^- of a consistency student (decay ``target_ema``, constant:
    Song et al. 2023, Algorithm 2, mu) and, when ``sample_ema`` > 0, a slower average of the
    online weights for sampling (the consistency-models code samples such an EMA, 0.999 to
    0.9999, not theta^-). The model to save is ``(sampler or target).model``."""
    d = cfg.diffusion
    target = EMA(student, d.target_ema, warmup=False)
    return target, EMA(student, d.sample_ema, warmup=True) if d.sample_ema > 0 else None


def scheduler_like(cls, teacher_scheduler, **overrides):
    """A diffusers scheduler of class ``cls`` with the teacher's betas and prediction type
    (the keys of its config that ``cls`` takes) and ``overrides``."""
    keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
    base = {k: v for k, v in teacher_scheduler.config.items() if k in keys}
    return cls(**{**base, "clip_sample": False, "thresholding": False, **overrides})


def student_scheduler(teacher_scheduler, grid_points: int, timestep_scaling: float):
    """The ``LCMScheduler`` of a consistency student: the teacher's betas and prediction type,
    the grid of ``grid_points`` timesteps it was distilled on, and the boundary scalings'
    timestep scaling."""
    from diffusers import LCMScheduler

    return scheduler_like(LCMScheduler, teacher_scheduler, original_inference_steps=grid_points,
                          timestep_scaling=timestep_scaling)  # fmt: skip


def ddim_scheduler(teacher_scheduler):
    """The ``DDIMScheduler`` of a student sampled with deterministic DDIM on the teacher's
    trailing grid (``stages.diffusion.sampling.ode_timesteps``): diffusers' ``set_timesteps(n)``
    picks the same n timesteps and its last step ends at the clean data (alpha 1)."""
    from diffusers import DDIMScheduler

    return scheduler_like(DDIMScheduler, teacher_scheduler, timestep_spacing="trailing", set_alpha_to_one=True,
                          steps_offset=0)  # fmt: skip


class Probe:
    """The paired error mean_z ||student(z) - teacher_ODE(z)||_2 on a fixed batch of
    ``eval_samples`` seeded noise vectors ``z``; the reference is the teacher's
    ``eval_steps``-step DDIM solution, computed once."""

    def __init__(self, teacher: Generator, cfg: DistillConfig, device):
        d = cfg.diffusion
        self.teacher = teacher
        self.z = SampleNoise(range(EVAL_SEED, EVAL_SEED + d.eval_samples), teacher.sample_shape).draw().to(device)
        self.reference = self.ddim(teacher.denoise, d.eval_steps)

    @torch.no_grad()
    def ddim(self, denoise: Denoise, steps: int) -> torch.Tensor:
        """``steps``-step DDIM samples of ``denoise`` (on the teacher's schedule) from z."""
        return ode_sample(denoise, self.teacher.schedule, self.z, steps, "ddim")

    def __call__(self, x: torch.Tensor) -> float:
        return float((x - self.reference).flatten(1).norm(dim=1).mean())

    def teacher_error(self, steps: int) -> float:
        """The teacher's own paired error at ``steps`` DDIM steps: what a student must beat."""
        return self(self.ddim(self.teacher.denoise, steps))
