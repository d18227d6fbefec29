"""The discrete variance-preserving noise schedule of a diffusers scheduler, as tensors.

``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])`` (Ho et al. 2020, eq. 4); timestep ``-1`` stands
for the clean end of the ODE (alpha 1, sigma 0). The network's output is read according to
the scheduler's ``prediction_type``: ``epsilon``, ``v_prediction`` (v = alpha eps - sigma x_0,
Salimans & Ho 2022, section 4) or ``sample`` (x_0 itself).

``KarrasSchedule`` is the variance-exploding counterpart (x_sigma = x_0 + sigma z on Karras
noise levels) of a consistency model trained without a teacher (``consistency-train``),
saved with diffusers' ``CMStochasticIterativeScheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.errors import DistilError

PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row vector [B] shaped to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor
    """[T] float64."""
    prediction: str

    @classmethod
    def of(cls, scheduler, where: str) -> NoiseSchedule:
        """The schedule of a diffusers scheduler; one clear error when it has none we can use."""
        name = type(scheduler).__name__
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor) or not hasattr(scheduler, "set_timesteps"):
            raise DistilError(
                f"{where}: scheduler {name} has no alphas_cumprod/set_timesteps (a DDPM-style discrete noise schedule), "
                "which distil's samplers and consistency distillation need; use DDPMScheduler, DDIMScheduler or LCMScheduler"
            )
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise DistilError(
                f"{where}: prediction_type '{prediction}' of {name} is not supported; use one of {', '.join(PREDICTIONS)}"
            )
        ac = ac.double()
        if not torch.isfinite(ac).all() or ac.min() <= 0 or ac.max() > 1:
            raise DistilError(f"{where}: scheduler {name} has alphas_cumprod outside (0, 1]; check its betas")
        return cls(ac, prediction)

    @property
    def T(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) float64 [B] for integer timesteps t [B] in [-1, T)."""
        t = torch.as_tensor(t).long().cpu()
        ac = torch.where(t >= 0, self.alphas_cumprod[t.clamp_min(0)], torch.ones((), dtype=torch.float64))
        return ac.sqrt(), (1 - ac).clamp_min(0).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (bcast(v, x0).to(x0) for v in self.alpha_sigma(t))
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at x_t = alpha x0 + sigma eps."""
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "sample":
            return x0
        a, s = (bcast(v, x0).to(x0) for v in self.alpha_sigma(t))
        return a * eps - s * x0

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network output at (x_t, t), computed in float64.

        For epsilon prediction x0 = (x - sigma eps) / alpha divides by alpha, which nearly
        vanishes at the end of a cosine schedule: pair cosine with v_prediction."""
        a, s = (bcast(v, x).to(x.device) for v in self.alpha_sigma(t))
        out, x = out.double(), x.double()
        if self.prediction == "epsilon":
            return (x - s * out) / a, out
        if self.prediction == "v_prediction":
            return a * x - s * out, s * x + a * out
        return out, (x - a * out) / s.clamp_min(1e-12)

    def boundary(self, t: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LCM's boundary scalings (Luo et al. 2023, "Latent Consistency Models", eq. 8;
        diffusers' ``LCMScheduler``): with sigma_data = 0.5 and u = s * t,
        c_skip(t) = sigma_data^2 / (u^2 + sigma_data^2) and c_out(t) = u / sqrt(u^2 + sigma_data^2),
        so c_skip(0) = 1 and c_out(0) = 0 (f(x, 0) = x, Song et al. 2023, eq. 3). float64 [B]."""
        u = torch.as_tensor(t).double().clamp_min(0).cpu() * timestep_scaling
        return 0.25 / (u**2 + 0.25), u / (u**2 + 0.25).sqrt()


@dataclass
class FlowSchedule:
    """The linear interpolant x_sigma = (1 - sigma) x_0 + sigma z, sigma from 1 (noise) to 0 (data), of
    a flow map (``flow-map``), saved with diffusers' ``FlowMatchEulerDiscreteScheduler`` (its
    convention: velocity z - x_0, Euler steps x + (sigma' - sigma) v); the network sees the times as
    ``T`` sigma, as diffusers' flow-matching pipelines pass ``sigma * num_train_timesteps``."""

    T: int
    prediction: str = "flow_map"

    @classmethod
    def of(cls, scheduler, where: str) -> FlowSchedule:
        if scheduler.config.get("shift", 1.0) != 1.0 or scheduler.config.get("use_dynamic_shifting"):
            raise DistilError(f"{where}: a flow map is sampled on the unshifted interpolant; its scheduler has a time shift")
        return cls(int(scheduler.config.num_train_timesteps))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """``n`` >= 2 noise levels from sigma_min up to sigma_max, float64 [n]: Karras et al. 2022
    ("Elucidating the Design Space", eq. 5), sigma_i = (sigma_min^(1/rho) + i/(n-1)
    (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, the discretisation of consistency
    training (Song et al. 2023; Song & Dhariwal 2023, section 3.1)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


@dataclass
class KarrasSchedule:
    """The noise levels of a variance-exploding consistency model, as diffusers'
    ``CMStochasticIterativeScheduler`` holds them: x_sigma = x_0 + sigma z on the Karras grid
    of ``num_train_timesteps`` levels. Integer timestep t in [0, T) is the t-th level from
    sigma_min up (T - 1 is sigma_max), -1 the clean end, as for ``NoiseSchedule``.

    The network F is read with EDM's preconditioning and the consistency model's boundary
    condition (Song et al. 2023, "Consistency Models", appendix C, with epsilon = sigma_min;
    diffusers' ``scale_model_input`` / ``sigma_to_t`` / ``get_scalings_for_boundary_condition``):
    f(x, sigma) = c_skip x + c_out F(c_in x, c_noise), c_skip = sigma_d^2 / ((sigma - sigma_min)^2
    + sigma_d^2), c_out = (sigma - sigma_min) sigma_d / sqrt(sigma^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_noise = 250 ln sigma; so f(x, sigma_min) = x."""

    sigmas: torch.Tensor
    """[T] float64, ascending."""
    sigma_data: float
    prediction: str = "edm"

    @classmethod
    def of(cls, scheduler, where: str) -> KarrasSchedule:
        c = scheduler.config
        if not (0 < c.sigma_min < c.sigma_max and c.sigma_data > 0 and c.rho > 0 and c.num_train_timesteps >= 2):
            raise DistilError(f"{where}: {type(scheduler).__name__} needs 0 < sigma_min < sigma_max, sigma_data > 0, "
                              "rho > 0 and num_train_timesteps >= 2")  # fmt: skip
        return cls(karras_sigmas(c.num_train_timesteps, c.sigma_min, c.sigma_max, c.rho), float(c.sigma_data))

    @property
    def T(self) -> int:
        return len(self.sigmas)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t float64 [B] for integer timesteps t [B] in [-1, T)."""
        t = torch.as_tensor(t).long().cpu()
        return torch.where(t >= 0, self.sigmas[t.clamp_min(0)], torch.zeros((), dtype=torch.float64))

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise), float64 [B], for noise levels sigma [B]."""
        sigma, sd, eps = torch.as_tensor(sigma).double().cpu(), self.sigma_data, float(self.sigmas[0])
        norm = (sigma**2 + sd**2).sqrt()
        return sd**2 / ((sigma - eps) ** 2 + sd**2), (sigma - eps) * sd / norm, 1 / norm, 250 * torch.log(sigma + 1e-44)

    def boundary(self, t: torch.Tensor, timestep_scaling: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at integer timesteps t, the counterpart of ``NoiseSchedule.boundary``."""
        return self.scalings(self.sigma(t))[:2]

    def add_noise(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler's re-noising to level t: x_0 + sqrt(sigma_t^2 - sigma_min^2) z (Song et al.
        2023, Algorithm 1; diffusers' ``step``), so the sample keeps the sigma_min it starts from."""
        s = (self.sigma(t) ** 2 - self.sigmas[0] ** 2).clamp_min(0).sqrt()
        return (x0.double() + bcast(s, x0).to(x0.device) * z.double()).to(x0.dtype)
