"""``distill --method consistency-train``: a consistency model trained from data alone (iCT).

Improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models"), in its own variance-exploding parameterisation x_sigma = x + sigma z
(``schedule.KarrasSchedule``, saved with diffusers' ``CMStochasticIterativeScheduler``):

- noise levels sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho, i = 1..N (Karras et al. 2022, as in their section 2; sigma_min
  0.002, sigma_max 80, rho 7), with N following the doubling curriculum of their section
  3.4, N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)),
  s0 = 10, s1 = 1280 (``diffusion.curriculum``), over the run's K optimiser steps;
- the level index i ~ p(sigma_i) proportional to erf((ln sigma_{i+1} - P_mean) /
  (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std)) (section 3.5, the lognormal
  noise schedule, P_mean -1.1, P_std 2.0);
- the consistency training loss lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}),
  f_theta^-(x + sigma_i z, sigma_i)) with the same z (section 2), lambda(sigma_i) =
  1 / (sigma_{i+1} - sigma_i) (section 3.1) and the pseudo-Huber d(a, b) =
  sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (section 3.3,
  ``losses.consistency.pseudo_huber``);
- no EMA teacher: theta^- = stopgrad(theta), the same network (section 3.2);
  the saved weights are an EMA of the trained ones (``diffusion.ema``), for sampling;
- f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with sigma_data 0.5 and
  f(x, sigma_min) = x (``sampling.karras_fn``).

The data's scale. iCT's constants are set for CIFAR-10 in [-1, 1], whose values have std
about 0.5 = sigma_data. Scaling data by r scales every noise level of the same process
by r, so with r = data_std / 0.5 (``diffusion.data_std``, 0 = the train split's std: 1 for
the standardised toys) this trains sigma in [0.002 r, 80 r], sigma_data = 0.5 r,
P_mean + ln r and c r: iCT exactly, on data rescaled to std 0.5. In the teacher's VP
terms a level sigma is the timestep t with sigma_t / alpha_t = sigma (x_VP = x_sigma / sqrt(1 +
sigma^2)); the cosine schedule's 1000 steps span sigma in [0.0064, 2.0e4] (t = 0 to 999), so
for the toys (r = 2) sigma_max = 160 sits at t = 995 and sigma_min = 0.004 just below t = 0.
The two parameterisations share no weights or timesteps, so a hybrid first step is refused.

Sampling (``sampling.consistency_sample``): Song et al.'s multistep consistency sampling
(Algorithm 1) on diffusers' ``set_timesteps(s)`` levels, every (N // s)-th from sigma_max:
x = sigma_max z, x0 = f(x, sigma), re-noise with sqrt(sigma'^2 - sigma_min^2) fresh noise.
"""

from __future__ import annotations

import math

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.metrics.distances import sliced_wasserstein
from stages.diffusion.models import build_denoiser
from stages.diffusion.sampling import SampleNoise, karras_fn
from stages.diffusion.schedule import KarrasSchedule, karras_sigmas
from stages.diffusion.students import EVAL_SEED, net
from stages.diffusion.training import EMA, fit, plan
from stages.errors import DistilError
from stages.losses.consistency import pseudo_huber

ICT_SIGMA_DATA = 0.5
"""The std of the data iCT's constants were set for (CIFAR-10 in [-1, 1])."""


def curriculum(s0: int, s1: int, total_steps: int):
    """k -> N(k), the number of noise levels at optimiser step k (iCT eq. 8)."""
    if s0 < 1 or s1 < s0:
        raise DistilError(f"diffusion.curriculum must be [s0, s1] with 1 <= s0 <= s1, got {[s0, s1]}")
    stage = max(1, total_steps // (int(math.log2(s1 // s0)) + 1))
    return lambda k: min(s0 * 2 ** (k // stage), s1) + 1


def lognormal_index(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) over the N - 1 adjacent pairs (sigma_i, sigma_{i+1}) (iCT eq. 9), float64 [N - 1]."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


def _settings(cfg: DistillConfig, train: torch.Tensor) -> dict[str, float]:
    d = cfg.diffusion
    if not (0 < d.sigma_min < d.sigma_max) or d.rho <= 0 or d.p_std <= 0 or d.data_std < 0:
        raise DistilError("consistency-train needs 0 < sigma_min < sigma_max, rho > 0, p_std > 0 and data_std >= 0")
    if len(d.curriculum) != 2:
        raise DistilError(f"diffusion.curriculum must be [s0, s1], got {d.curriculum}")
    std = d.data_std or float(train.double().std())
    if not std > 0:
        raise DistilError("consistency-train: the train data has zero spread; set diffusion.data_std")
    r = std / ICT_SIGMA_DATA
    dim = math.prod(train.shape[1:])
    return {"data_std": std, "scale": r, "sigma_min": d.sigma_min * r, "sigma_max": d.sigma_max * r,
            "sigma_data": ICT_SIGMA_DATA * r, "p_mean": d.p_mean + math.log(r), "p_std": d.p_std,
            "huber_c": d.huber_c if d.huber_c > 0 else 0.00054 * math.sqrt(dim) * r}  # fmt: skip


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(consistency model, its CMStochasticIterativeScheduler, summary)."""
    from diffusers import CMStochasticIterativeScheduler

    d = cfg.diffusion
    x_train = data.split("train")
    s = _settings(cfg, x_train)
    (s0, s1), rho = d.curriculum, d.rho
    _, per_epoch, epochs = plan(cfg, len(x_train))
    levels = curriculum(s0, s1, epochs * per_epoch)
    schedule = KarrasSchedule(karras_sigmas(s1 + 1, s["sigma_min"], s["sigma_max"], rho), s["sigma_data"])
    grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    model = build_denoiser(d, data.sample_shape, cfg.seed).to(device)
    ema = EMA(model, d.ema, warmup=True)

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        N = levels(ema.updates)  # the optimiser steps taken so far: restored with a checkpoint
        if N not in grids:
            sig = karras_sigmas(N, s["sigma_min"], s["sigma_max"], rho)
            grids[N] = sig, lognormal_index(sig, s["p_mean"], s["p_std"])
        sig, p = grids[N]
        i = torch.multinomial(p, len(x0), replacement=True, generator=g)
        z = torch.randn(x0.shape, generator=g).to(x0.device)
        lo, hi = sig[i], sig[i + 1]
        x_hi, x_lo = (x0 + v.reshape(-1, *[1] * (x0.ndim - 1)).to(x0) * z for v in (hi, lo))
        with torch.no_grad():
            y = karras_fn(net(model), schedule, x_lo, lo)
        return pseudo_huber(karras_fn(net(model), schedule, x_hi, hi), y, s["huber_c"], weight=1 / (hi - lo))

    dev = data.split("dev")
    z = SampleNoise(range(EVAL_SEED, EVAL_SEED + min(d.eval_samples, 2048)), data.sample_shape).draw().to(device)

    @torch.no_grad()
    def on_epoch(epoch: int) -> dict[str, float]:
        row = {"noise_levels": levels(max(ema.updates - 1, 0))}
        if len(dev) >= 2:
            top = torch.full((len(z),), s["sigma_max"], dtype=torch.float64)
            one_step = karras_fn(net(ema.model), schedule, z * s["sigma_max"], top)
            row["dev_sw_1step"] = sliced_wasserstein(one_step.flatten(1).cpu(), dev.flatten(1))
        return row

    progress = fit(model, ema, x_train, cfg, work, loss, device=device, label="consistency-train", bar=bar, live=live,
                   on_epoch=on_epoch)  # fmt: skip
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=s1 + 1, sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                                               sigma_data=s["sigma_data"], rho=rho, clip_denoised=False)  # fmt: skip
    summary = {**s, "rho": rho, "curriculum": [s0, s1], "noise_levels_final": levels(epochs * per_epoch - 1),
               "total_steps": epochs * per_epoch, "ema": d.ema, "epochs": progress["epoch"],
               "train_seconds": progress["seconds"], "history": progress["history"]}  # fmt: skip
    return ema.model, scheduler, summary
