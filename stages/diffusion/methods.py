"""The diffusion methods of ``distil distill``: one explicit name -> method table.

Kept free of heavy imports (diffusers loads only when a method runs), so the CLI lists
the methods in ``--help`` without paying for them. A method's module defines
``train(cfg, data, teacher, work, device=, bar=, live=) -> (model, scheduler, summary)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionMethod:
    help: str
    module: str
    teacher: bool
    """Needs one diffusion teacher (--teacher DIR)."""

    @property
    def train(self) -> Callable:
        return importlib.import_module(self.module).train


DIFFUSION_METHODS = {
    "denoise": DiffusionMethod(
        "train a diffusion teacher on generator data (moons, digits-images, ...): DDPM loss, epsilon or v prediction, "
        "EMA weights; MLP for 2-D points, UNet2DModel for images; saved in diffusers' layout",
        "stages.diffusion.train_denoise", False,
    ),
    "consistency-distill": DiffusionMethod(
        "consistency distillation (CD / LCM) from a --teacher: one teacher DDIM step skipping k timesteps, EMA target "
        "(0.95), c_skip/c_out boundary scalings, l2 or pseudo-Huber; a 1-4 step student saved with an LCMScheduler",
        "stages.diffusion.consistency", True,
    ),
}  # fmt: skip
