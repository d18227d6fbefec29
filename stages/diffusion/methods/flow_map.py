"""``distill --method flow-map``: a flow map learnt from data alone by Lagrangian self-distillation.

Boffi, Albergo & Vanden-Eijnden, "How to build a consistency model: Learning flow maps via
self-distillation" (2025), the Lagrangian family (LSD), on the linear interpolant x_sigma =
(1 - sigma) x_0 + sigma z (sigma from 1, noise, to 0, data; velocity v = z - x_0, the convention of
diffusers' ``FlowMatchEulerDiscreteScheduler``, which the map is saved with):

- the flow map X_{sigma, tau}(x), which carries a point at time sigma along the flow's ODE to time
  tau, is parameterised X_{sigma, tau}(x) = x + (tau - sigma) u_theta(x, sigma, tau)
  (``sampling.flow_map_fn``), so X_{sigma, sigma} = x holds exactly and u_theta(x, s, s) is the
  velocity field itself (the paper's identity between the flow and the map's diagonal);
- **diagonal** (a ``diffusion.flow_diagonal`` share of each batch): flow matching of the
  velocity, || u_theta(x_sigma, sigma, sigma) - (z - x_0) ||^2, sigma ~ U[0, 1];
- **Lagrangian self-distillation** (the rest): for sigma ~ U[0, 1], tau ~ U[0, sigma], the map must
  follow the flow at its end point, d/dtau X_{sigma, tau}(x_sigma) = v(X_{sigma, tau}(x_sigma), tau),
  with the model's own diagonal as the velocity (stop-gradient, the "self" of self-distillation):
  || d/dtau X_{sigma, tau}(x_sigma) - sg(u_theta(X_{sigma, tau}(x_sigma), tau, tau)) ||^2. Lagrangian
  methods need no spatial derivative and no bootstrapping from small steps (the paper's finding
  is that they train more stably than the Eulerian and progressive families). The derivative in
  tau is a central difference over tau +- ``H`` (the paper uses forward-mode autodiff, which
  diffusers' U-Net blocks do not support on CPU: group norm and fused attention lack it);
- no teacher and no target network; the saved weights are an EMA (``diffusion.ema``), as
  ``consistency-train`` saves its EMA.

Sampling (``sampling.flow_map_sample``): n jumps X_{sigma_i, sigma_{i+1}} on the even grid
sigma_i = 1 - i / n, one network call each, from pure noise.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.metrics.distances import sliced_wasserstein
from stages.diffusion.models import build_denoiser
from stages.diffusion.sampling import SampleNoise, flow_map_fn
from stages.diffusion.students import EVAL_SEED
from stages.diffusion.training import EMA, fit

T = 1000
"""The network sees the times as T sigma (diffusers' flow-matching convention, num_train_timesteps)."""
H = 0.002
"""Half-width of the central difference in tau (2 of the network's T time units)."""


def lagrangian_residual(model, x: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """d/dtau X_{sigma, tau}(x) - sg(u(X, tau, tau)) per row (float of x's dtype), the derivative a
    central difference over [tau - H, tau + H] clipped to [0, sigma] (sigma >= 2 H)."""
    lo, hi = (tau - H).clamp_min(0), torch.minimum(tau + H, sigma)
    x_lo, x_hi = flow_map_fn(model, T, x, sigma, lo), flow_map_fn(model, T, x, sigma, hi)
    width = (hi - lo).to(x.dtype).to(x.device).reshape(-1, *[1] * (x.ndim - 1))
    d_tau = (x_hi - x_lo) / width
    with torch.no_grad():
        end = 0.5 * (x_lo + x_hi)  # X_{sigma, tau}(x) up to O(H^2)
        c = ((lo + hi) / 2).to(torch.float64)
        velocity = model(end, (c * T).to(x.dtype).to(x.device), class_labels=(c * T).to(x.dtype).to(x.device)).sample
    return d_tau - velocity


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(flow map, its FlowMatchEulerDiscreteScheduler, summary)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = cfg.diffusion
    x_train = data.split("train")
    model = build_denoiser(d, data.sample_shape, cfg.seed, two_times=True).to(device)
    ema = EMA(model, d.ema, warmup=True)
    seen: dict[str, list[float]] = {"diagonal": [], "lagrangian": []}

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = len(x0)
        n_diag = min(b, max(1, round(d.flow_diagonal * b))) if d.flow_diagonal > 0 else 0
        z = torch.randn(x0.shape, generator=g).to(x0.device)
        sigma = 2 * H + (1 - 2 * H) * torch.rand(b, generator=g, dtype=torch.float64)
        tau = sigma * torch.rand(b, generator=g, dtype=torch.float64)
        s = sigma.to(x0.dtype).to(x0.device).reshape(-1, *[1] * (x0.ndim - 1))
        x = (1 - s) * x0 + s * z
        parts = []
        if n_diag:
            rows = slice(0, n_diag)
            u = model(x[rows], (sigma[rows] * T).to(x0.dtype).to(x0.device),
                      class_labels=(sigma[rows] * T).to(x0.dtype).to(x0.device)).sample  # fmt: skip
            fm = ((u - (z[rows] - x0[rows])) ** 2).flatten(1).mean(1)
            parts.append(fm)
            seen["diagonal"].append(float(fm.mean().detach()))
        if n_diag < b:
            rows = slice(n_diag, b)
            lag = lagrangian_residual(model, x[rows], sigma[rows], tau[rows]).pow(2).flatten(1).mean(1)
            parts.append(lag)
            seen["lagrangian"].append(float(lag.mean().detach()))
        return torch.cat(parts).mean()

    dev = data.split("dev")
    z_eval = SampleNoise(range(EVAL_SEED, EVAL_SEED + min(d.eval_samples, 2048)), data.sample_shape).draw().to(device)

    @torch.no_grad()
    def on_epoch(epoch: int) -> dict[str, float]:
        if len(dev) < 2:
            return {}
        one, zero = torch.ones(len(z_eval), dtype=torch.float64), torch.zeros(len(z_eval), dtype=torch.float64)
        one_step = flow_map_fn(ema.model, T, z_eval, one, zero)
        return {"dev_sw_1step": sliced_wasserstein(one_step.flatten(1).cpu(), dev.flatten(1))}

    progress = fit(model, ema, x_train, cfg, work, loss, device=device, label="flow-map", bar=bar, live=live,
                   on_epoch=on_epoch)  # fmt: skip
    tenth = lambda v: sum(v[-max(1, len(v) // 10) :]) / max(1, len(v) // 10) if v else None  # noqa: E731
    summary = {"interpolant": "linear, x = (1 - sigma) x0 + sigma z", "diagonal_share": d.flow_diagonal,
               "difference_half_width": H, "ema": d.ema, "epochs": progress["epoch"], "train_seconds": progress["seconds"],
               "diagonal_loss_last": tenth(seen["diagonal"]), "lagrangian_loss_last": tenth(seen["lagrangian"]),
               "history": progress["history"]}  # fmt: skip
    return ema.model, FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0), summary
