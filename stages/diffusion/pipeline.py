"""A minimal diffusers pipeline for generators whose network is not an image U-Net (the
2-D ``MLPDenoiser``), so that diffusers' own loading machinery reads their folders:
``DistilGeneratorPipeline.from_pretrained(dir)``. Sampling goes through the saved
scheduler's ``set_timesteps`` / ``step`` (DDPM ancestral sampling for a teacher's
``DDPMScheduler``, multistep consistency sampling for a student's ``LCMScheduler``), or, for a
flow map saved with a ``FlowMatchEulerDiscreteScheduler`` (2-D or images), its jumps
X_{sigma, tau} on an even grid (``stages.diffusion.sampling.flow_map_fn``); distil itself samples
with ``stages.diffusion.sampling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class GeneratorOutput(BaseOutput):
    samples: torch.Tensor


class DistilGeneratorPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser, scheduler):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator: torch.Generator | None = None,
                 return_dict: bool = True):  # fmt: skip
        from stages.diffusion.models import sample_shape_of
        from stages.diffusion.sampling import flow_map_fn, flow_map_times

        shape = (batch_size, *sample_shape_of(self.denoiser))
        x = randn_tensor(shape, generator=generator, device=self.device) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        if type(self.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            times, T = flow_map_times(num_inference_steps), int(self.scheduler.config.num_train_timesteps)
            for i in self.progress_bar(range(num_inference_steps)):
                sigma, tau = (torch.full((batch_size,), float(v), dtype=torch.float64) for v in times[i : i + 2])
                x = flow_map_fn(self.denoiser, T, x, sigma, tau)
            return GeneratorOutput(samples=x) if return_dict else (x,)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.denoiser(self.scheduler.scale_model_input(x, t), t).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        return GeneratorOutput(samples=x) if return_dict else (x,)
