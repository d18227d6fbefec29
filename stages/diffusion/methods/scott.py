"""``distill --method scott``: consistency distillation whose teacher step is stochastic.

Stochastic Consistency Distillation (Liu et al., "SCott: Accelerating Diffusion Models with
Stochastic Consistency Distillation", 2024): the same training as ``consistency-distill``
(``stages.diffusion.methods.consistency``: x_t from the data, one teacher step to s = t - k, the
loss between the student at (x_t, t) and its EMA target at (x_s, s)), except that the teacher's
step is an SDE solver step with a controlled noise strength rather than the ODE's:
``stages.diffusion.sampling.sde_step`` with eta = ``diffusion.noise_strength`` (0 gives back
consistency distillation with DDIM, 1 the ancestral step), its noise drawn from the run's
seeded generator so a resumed run repeats it. The paper's further strategies (a schedule of the
noise strength over training, and an adversarial loss for 1-step quality) are not part of
this method: its noise strength is fixed.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods import consistency
from stages.diffusion.sampling import sde_step


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(student to save, its LCMScheduler, summary with the noise strength)."""
    eta = cfg.diffusion.noise_strength

    def stochastic(denoise, schedule, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return sde_step(denoise, schedule, x_t, t, s, eta, torch.randn(x_t.shape, generator=g).to(x_t.device))

    model, scheduler, summary = consistency.train(cfg, data, teacher_path, work, device=device, bar=bar, live=live,
                                                  method="scott", teacher_step=stochastic)  # fmt: skip
    return model, scheduler, {**summary, "noise_strength": eta, "solver": "sde"}
