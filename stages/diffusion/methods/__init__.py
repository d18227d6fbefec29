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
    trajectories_only: bool = False
    """Learns from generate-teacher-data trajectories alone: --data must be such a folder
    (checked before anything is read), never a dataset."""

    @property
    def train(self) -> Callable:
        return importlib.import_module(self.module).train


DIFFUSION_METHODS = {
    "denoise": DiffusionMethod(
        "train a diffusion teacher on generator data (moons, digits-images, ...): DDPM loss, epsilon or v prediction, "
        "EMA weights; MLP for 2-D points, UNet2DModel for images; saved in diffusers' layout",
        "stages.diffusion.methods.denoise", False,
    ),
    "consistency-distill": DiffusionMethod(
        "consistency distillation (CD / LCM) from a --teacher: one teacher DDIM step skipping k timesteps, EMA target "
        "(0.95), c_skip/c_out boundary scalings, l2 or pseudo-Huber; a 1-4 step student saved with an LCMScheduler",
        "stages.diffusion.methods.consistency", True,
    ),
    "multistep": DiffusionMethod(
        "multistep consistency distillation (MCM / MLCM; Hyper-SD's trajectory segmented CD) from a --teacher: the time "
        "axis cut into diffusion.segments segments, consistency within each towards its start; sampled in that many "
        "deterministic DDIM steps along the boundaries (saved with a DDIMScheduler)",
        "stages.diffusion.methods.multistep", True,
    ),
    "consistency-train": DiffusionMethod(
        "improved consistency training (iCT) from data, no teacher: Karras noise levels, lognormal level sampling, "
        "pseudo-Huber loss weighted 1/(sigma_{i+1} - sigma_i), levels doubling 10 -> 1280, no EMA target; saved with a "
        "CMStochasticIterativeScheduler",
        "stages.diffusion.methods.consistency_train", False,
    ),
    "flow-map": DiffusionMethod(
        "a flow map learnt from data alone by Lagrangian self-distillation (Boffi et al. 2025), no teacher: flow matching "
        "on the diagonal s = t, d/dt X_{s,t} = velocity at X_{s,t} off it; sampled in n jumps, one call each (saved with "
        "a FlowMatchEulerDiscreteScheduler)",
        "stages.diffusion.methods.flow_map", False,
    ),
    "trajectory": DiffusionMethod(
        "image-free consistency distillation (TBCM) from pairs on the --teacher's own ODE trajectories: --data is its "
        "generate-teacher-data output (an even grid of saved steps), never a dataset; saved with an LCMScheduler",
        "stages.diffusion.methods.trajectory", True, trajectories_only=True,
    ),
    "progressive": DiffusionMethod(
        "progressive distillation (Salimans & Ho) of a --teacher: rounds in which a student matches two DDIM steps of "
        "its teacher with one, halving diffusion.teacher_steps down to target_steps; saved with a DDIMScheduler",
        "stages.diffusion.methods.progressive", True,
    ),
    "multi-student": DiffusionMethod(
        "multi-student distillation (MSD) of a class-conditional --teacher: diffusion.students consistency students, each "
        "on a group of the classes (optionally smaller: student_init fresh), saved as one model that routes by class",
        "stages.diffusion.methods.multi_student", True,
    ),
    "dual-expert": DiffusionMethod(
        "dual-expert consistency (DCM) from a --teacher: multistep's segmented consistency distillation with a semantic "
        "expert for the high-noise segments and a detail expert for the low-noise ones, chosen by timestep",
        "stages.diffusion.methods.dual_expert", True,
    ),
    "scott": DiffusionMethod(
        "stochastic consistency distillation (SCott) from a --teacher: consistency-distill whose teacher step is an SDE "
        "step with noise strength diffusion.noise_strength (0 = DDIM, 1 = ancestral); saved with an LCMScheduler",
        "stages.diffusion.methods.scott", True,
    ),
    "dmd": DiffusionMethod(
        "distribution matching distillation (DMD) of a --teacher into a one-step generator: the gradient of KL(fake || real) "
        "from the frozen teacher's and a trained fake score's data predictions on noised generator samples, plus a "
        "regression onto the teacher's ODE solutions; saved with an LCMScheduler (1 step)",
        "stages.diffusion.methods.dmd", True,
    ),
    "phased-dmd": DiffusionMethod(
        "phased distribution matching (Phased DMD) of a --teacher into a diffusion.phases-step generator: one expert per "
        "phase of the SNR range, trained phase after phase by DMD on its subinterval, the fake score matched to the "
        "subinterval's conditional score; sampled in that many DDIM steps (saved with a DDIMScheduler)",
        "stages.diffusion.methods.phased_dmd", True,
    ),
    "control-lora": DiffusionMethod(
        "control transfer (Gandikota & Bau 2025): a LoRA (peft) fitted to an unconditional --teacher on the train images "
        "of diffusion.control_class, saved merged and as an adapter that evaluate --set control=DIR applies unchanged "
        "to the teacher's distilled students",
        "stages.diffusion.methods.control_lora", True,
    ),
    "cfg-distill": DiffusionMethod(
        "classifier-free guidance distilled (Meng et al. 2023, stage one) from a class-conditional --teacher: the student "
        "alone gives (1 + w) F(x, c) - w F(x) for each w of diffusion.guidance_weights, one network call per step",
        "stages.diffusion.methods.cfg_distill", True,
    ),
}  # fmt: skip
