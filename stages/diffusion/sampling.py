"""Sampling generators: deterministic ODE solvers for diffusion teachers, multistep
consistency sampling for students, and the hybrid of the two.

Every sample ``i`` of a run draws its noise from its own ``torch.Generator`` seeded
``seed + i``, so a sample does not depend on the batch it lands in, a resumed run repeats
it exactly, and the same seed gives teacher and student the same starting noise (the
paired error ``||student(z) - teacher_ODE(z)||`` compares them on it).

Solvers step between integer timesteps of the teacher's own schedule, on the "trailing"
grid ``round(T - i T / N) - 1`` (Lin et al. 2024, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", table 2: the first step starts at the last trained timestep),
and end at the clean data (timestep -1, sigma 0):

- ``ddim``: DDIM with eta = 0 (Song et al. 2021, eq. 12): x_s = alpha_s x0_hat + sigma_s eps_hat.
- ``euler``: Euler's method on the probability-flow ODE in Karras et al.'s variables
  (2022, eq. 4 with x~ = x / alpha, sigma~ = sigma / alpha): x~_s = x~_t + (sigma~_s - sigma~_t) eps_hat.
  Algebraically the same update as DDIM (Karras et al., section 3); kept as the reference
  form, computed in float64, and tested equal to ``ddim``.
- ``heun``: Heun's method (explicit trapezoid, 2nd order) in the exponential-integrator
  form of the ODE (Lu et al. 2022, "DPM-Solver++", eq. 9 and its second-order solvers):
  the DDIM step predicts x_s, then x_0's prediction is averaged over both ends,
  x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) (x0_t + x0_s) / 2, h = lambda_s - lambda_t,
  lambda = log(alpha / sigma); the last step (to sigma 0) stays DDIM. 2N - 1 network
  evaluations for N steps. Karras et al.'s Heun (Algorithm 1) averages the slopes in
  sigma~ instead; on this grid its first step spans sigma~ from ~2e4 (cosine schedule,
  t = T - 1) down to ~10, where averaging the end slopes diverges.

Consistency students are sampled on their scheduler's timesteps: an ``LCMScheduler``'s
(LCM parameterisation on the teacher's VP schedule) or a ``CMStochasticIterativeScheduler``'s
(variance-exploding Karras levels, ``consistency-train``); students saved with a
``DDIMScheduler`` (``multistep``, ``progressive``) are sampled with ``ddim`` like a teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.diffusion.generator import Generator, check_same_shape, load_generator
from stages.diffusion.schedule import KarrasSchedule, NoiseSchedule, bcast
from stages.errors import DistilError

SOLVERS = ("ddim", "euler", "heun")

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Record = Callable[[int, int, torch.Tensor], None]
"""record(step, timestep, state): called with the noise (step 0) and the state after each step."""


def check_sampling(steps: int, solver: str = "ddim") -> None:
    if steps < 1:
        raise DistilError(f"sampling needs at least 1 step, got steps = {steps}")
    if solver not in SOLVERS:
        raise DistilError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")


class SampleNoise:
    """One generator per sample, seeded ``seed + i``: initial noise, then the fresh noise
    of each consistency re-noising step, all drawn in a fixed order per sample."""

    def __init__(self, seeds: list[int], shape: list[int]):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = list(shape)

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])


def ode_timesteps(T: int, steps: int) -> list[int]:
    """The trailing grid of ``steps`` timesteps, from T - 1 down."""
    if steps > T:
        raise DistilError(f"{steps} ODE steps exceed the teacher's {T} timesteps")
    return [round(T - i * T / steps) - 1 for i in range(steps)]


def consistency_timesteps(gen: Generator, steps: int) -> list[int]:
    """The student's timesteps for ``steps`` steps, as diffusers' ``LCMScheduler`` picks
    them from its training grid (``original_inference_steps`` points, skip k apart), or
    ``CMStochasticIterativeScheduler.set_timesteps(steps)`` from its Karras levels: every
    (T // steps)-th level from sigma_max down (counted here from sigma_min up, ``KarrasSchedule``)."""
    if isinstance(gen.schedule, KarrasSchedule):
        T = gen.schedule.T
        if steps > T:
            raise DistilError(f"consistency model {gen.path}: {steps} steps exceed its {T} noise levels")
        return [T - 1 - i * (T // steps) for i in range(steps)]
    scheduler = copy.deepcopy(gen.scheduler)
    try:
        scheduler.set_timesteps(steps)
    except ValueError as exc:
        raise DistilError(f"consistency model {gen.path}: {str(exc).splitlines()[0]}") from None
    return [int(t) for t in scheduler.timesteps]


def ode_step(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             solver: str) -> torch.Tensor:  # fmt: skip
    """One solver step of the probability-flow ODE from timesteps t to s < t (per row, [B];
    s = -1 is the clean end). Returns x_s in x's dtype."""
    x0, eps = schedule.x0_eps(denoise(x, t), x, t)
    a_s, s_s = (bcast(v, x).to(x.device) for v in schedule.alpha_sigma(s))
    a_t, s_t = (bcast(v, x).to(x.device) for v in schedule.alpha_sigma(t))
    if solver == "euler":  # Karras et al.: x~ = x / alpha moves along sigma~ = sigma / alpha with slope eps
        return (a_s * (x.double() / a_t + (s_s / a_s - s_t / a_t) * eps)).to(x.dtype)
    ddim = a_s * x0 + s_s * eps
    if solver == "ddim":
        return ddim.to(x.dtype)
    if solver != "heun":
        raise DistilError(f"unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}")
    last = s < 0
    if bool(last.all()):
        return ddim.to(x.dtype)
    x_s = ddim.to(x.dtype)
    x0_s, _ = schedule.x0_eps(denoise(x_s, s.clamp_min(0)), x_s, s.clamp_min(0))
    # the trapezoid of the data predictions at both ends inside the exact integrator of the
    # linear part: x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) (x0_t + x0_s) / 2
    heun = ddim + (a_s - s_s * a_t / s_t) * (x0_s - x0) / 2
    return torch.where(bcast(last, x).to(x.device), ddim, heun).to(x.dtype)


def sde_step(denoise: Denoise, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, eta: float,
             noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One stochastic step from t to s < t with noise strength ``eta`` in [0, 1] (DDIM's eta, Song
    et al. 2021, eq. 12 and 16): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
    c = eta (sigma_s / sigma_t) sqrt(1 - alpha_t^2 / alpha_s^2), z = ``noise``:
    eta 0 is the ODE's DDIM step, eta 1 the ancestral (DDPM posterior) step. s = -1 is the clean end."""
    x0, eps = schedule.x0_eps(denoise(x, t), x, t)
    a_s, s_s = (bcast(v, x).to(x.device) for v in schedule.alpha_sigma(s))
    a_t, s_t = (bcast(v, x).to(x.device) for v in schedule.alpha_sigma(t))
    ratio = (a_t / a_s) ** 2
    c = eta * (s_s / s_t.clamp_min(1e-12)) * (1 - ratio).clamp_min(0).sqrt()
    out = a_s * x0 + (s_s**2 - c**2).clamp_min(0).sqrt() * eps + c * noise.double()
    return out.to(x.dtype)


def ode_sample(denoise: Denoise, schedule: NoiseSchedule, noise: torch.Tensor, steps: int, solver: str,
               record: Record | None = None) -> torch.Tensor:  # fmt: skip
    grid = [*ode_timesteps(schedule.T, steps), -1]
    x = noise
    if record:
        record(0, grid[0], x)
    for i in range(steps):
        t, s = (torch.full((len(x),), v, dtype=torch.long) for v in (grid[i], grid[i + 1]))
        x = ode_step(denoise, schedule, x, t, s, solver)
        if record and i + 1 < steps:
            record(i + 1, grid[i + 1], x)
    return x


def consistency_fn(denoise: Denoise, schedule: NoiseSchedule | KarrasSchedule, x: torch.Tensor, t: torch.Tensor,
                   scaling: float | None = None) -> torch.Tensor:  # fmt: skip
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat(F(x, t), x, t): the consistency model in
    LCM's parameterisation (Luo et al. 2023, eq. 8-9; Song et al. 2023, eq. 5), with F
    the network read by its prediction type; on a ``KarrasSchedule``, ``karras_fn`` at
    sigma_t. Differentiable (used in training)."""
    if isinstance(schedule, KarrasSchedule):
        return karras_fn(denoise, schedule, x, schedule.sigma(t))
    c_skip, c_out = (bcast(v, x).to(x.device) for v in schedule.boundary(t, scaling))
    x0, _ = schedule.x0_eps(denoise(x, t), x, t)
    return (c_skip * x.double() + c_out * x0).to(x.dtype)


def karras_fn(denoise: Denoise, schedule: KarrasSchedule, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) for per-row noise levels sigma [B]
    (``KarrasSchedule``; Song et al. 2023, eq. 5 and appendix C). Differentiable."""
    c_skip, c_out, c_in, c_noise = schedule.scalings(sigma)
    c_skip, c_out, c_in = (bcast(v, x).to(x.device) for v in (c_skip, c_out, c_in))
    out = denoise((c_in * x.double()).to(x.dtype), c_noise.to(x.device))
    return (c_skip * x.double() + c_out * out.double()).to(x.dtype)


def consistency_sample(gen: Generator, noise: SampleNoise, steps: int, *, hybrid: Generator | None = None,
                       solver: str = "ddim", record: Record | None = None, device=None) -> torch.Tensor:  # fmt: skip
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; diffusers'
    ``LCMScheduler.step``): x0 = f(x, tau_i), then re-noise x0 to tau_{i+1} with fresh
    noise; the last f is the sample. With ``hybrid``, that diffusion teacher takes the
    first step instead (one ``solver`` step from tau_1 to tau_2; Gandikota & Bau 2025,
    "Distilling Diversity and Control in Diffusion Models": the first step sets diversity)."""
    device = device or next(gen.model.parameters()).device
    taus = consistency_timesteps(gen, steps)
    x = noise.draw().to(device) * float(gen.scheduler.init_noise_sigma)  # sigma_max for a Karras model
    if record:
        record(0, taus[0], x)
    first = 0
    if hybrid is not None:
        t, s = (torch.full((len(x),), v, dtype=torch.long) for v in taus[:2])
        x = ode_step(hybrid.denoise, hybrid.schedule, x, t, s, solver)
        first = 1
        if record:
            record(1, taus[1], x)
    for i in range(first, steps):
        t = torch.full((len(x),), taus[i], dtype=torch.long)
        x0 = consistency_fn(gen.denoise, gen.schedule, x, t, gen.timestep_scaling)
        if i + 1 == steps:
            return x0
        x = gen.schedule.add_noise(x0, noise.draw().to(device), torch.full((len(x),), taus[i + 1], dtype=torch.long))
        if record:
            record(i + 1, taus[i + 1], x)
    raise AssertionError("unreachable")


def flow_map_times(steps: int) -> torch.Tensor:
    """sigma_0 = 1 > sigma_1 > ... > sigma_n = 0, even: the jumps of an n-step flow map (float64 [n + 1])."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def flow_map_fn(model: torch.nn.Module, T: int, x: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """X_{sigma, tau}(x) = x + (tau - sigma) u(x, sigma, tau) for per-row times [B] (Boffi, Albergo &
    Vanden-Eijnden 2025, "How to build a consistency model", the flow map's Euler-like
    parameterisation: X_{s,s} = x exactly); the network sees T sigma and T tau. Differentiable."""
    u = model(x, (sigma * T).to(x.dtype).to(x.device), class_labels=(tau * T).to(x.dtype).to(x.device)).sample
    return x + bcast((tau - sigma).to(x.dtype), x).to(x.device) * u


def flow_map_sample(gen: Generator, noise: SampleNoise, steps: int, record: Record | None = None,
                    device=None) -> torch.Tensor:  # fmt: skip
    """``steps`` jumps of a flow map from pure noise (sigma 1) to data (sigma 0) on an even grid; a
    recorded point is labelled with the teacher-grid timestep T sigma - 1 (``ode_timesteps``)."""
    device = device or next(gen.model.parameters()).device
    times = flow_map_times(steps)
    x = noise.draw().to(device)
    if record:
        record(0, gen.schedule.T - 1, x)
    for i in range(steps):
        sigma, tau = (torch.full((len(x),), float(v), dtype=torch.float64) for v in times[i : i + 2])
        x = flow_map_fn(gen.model, gen.schedule.T, x, sigma, tau)
        if record and i + 1 < steps:
            record(i + 1, round(float(times[i + 1]) * gen.schedule.T) - 1, x)
    return x


def check_hybrid(gen: Generator, hybrid: Generator | None, steps: int) -> None:
    if hybrid is None:
        return
    if gen.kind != "consistency":
        raise DistilError(
            f"hybrid_first_step hands the steps after the first to a consistency student; {gen.path} is a {'flow map' if gen.kind == 'flow-map' else 'diffusion teacher'}"
        )
    if isinstance(gen.schedule, KarrasSchedule):
        raise DistilError(
            f"hybrid_first_step: {gen.path} is a variance-exploding consistency model (consistency-train) with no VP "
            "schedule for a teacher's first step to hand over on; use an LCM student"
        )
    if hybrid.kind != "diffusion":
        raise DistilError(f"hybrid_first_step needs a diffusion teacher for the first step; {hybrid.path} is a consistency model")
    if steps < 2:
        raise DistilError("hybrid_first_step runs the teacher for the first step and the student after: it needs steps >= 2")
    check_same_shape(hybrid.sample_shape, gen.sample_shape, f"hybrid teacher {hybrid.path}", f"model {gen.path}")
    a, b = hybrid.schedule.alphas_cumprod, gen.schedule.alphas_cumprod
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-8):
        raise DistilError(
            f"hybrid teacher {hybrid.path} has another noise schedule than {gen.path}; use the student's own teacher"
        )


@torch.no_grad()
def sample(gen: Generator, seeds: list[int], steps: int, *, solver: str = "ddim", hybrid: Generator | None = None,
           record: Record | None = None, labels: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Samples [len(seeds), *shape] (on the model's device) from noise seeded per sample; of
    class ``labels[i]`` with guidance weight ``guidance`` for a class-conditional generator
    (``Generator.conditioned``; the hybrid teacher's first step is conditioned the same way)."""
    check_sampling(steps, solver)
    check_hybrid(gen, hybrid, steps)
    gen = gen.conditioned(labels, guidance)
    hybrid = hybrid.conditioned(labels, guidance) if hybrid is not None and hybrid.classes else hybrid
    noise = SampleNoise(seeds, gen.sample_shape)
    if gen.kind == "consistency":
        return consistency_sample(gen, noise, steps, hybrid=hybrid, solver=solver, record=record)
    if gen.kind == "flow-map":
        return flow_map_sample(gen, noise, steps, record=record)
    device = next(gen.model.parameters()).device
    return ode_sample(gen.denoise, gen.schedule, noise.draw().to(device), steps, solver, record)


def sample_generator(path: str | Path, n: int, steps: int, seed: int, hybrid_first_step_teacher: str | Path | None = None,
                     *, solver: str = "ddim", device: str | torch.device = "cpu", batch_size: int = 1024,
                     guidance: float | None = None) -> torch.Tensor:  # fmt: skip
    """``n`` samples [n, *sample_shape] (float32, CPU) of the generator folder at ``path``:
    an ODE solve of ``steps`` steps for a diffusion teacher, ``steps`` consistency steps for
    a student (with ``hybrid_first_step_teacher``: that teacher's first step, then the
    student's). Sample i starts from noise seeded ``seed + i``; with ``guidance`` (a
    class-conditional generator) it is of class i % classes, guided with that weight."""
    check_sampling(steps, solver)
    if n < 1 or batch_size < 1:
        raise DistilError(f"need n >= 1 samples and batch_size >= 1, got {n} and {batch_size}")
    gen = load_generator(path, device, "model")
    hybrid = load_generator(hybrid_first_step_teacher, device, "hybrid teacher") if hybrid_first_step_teacher else None
    check_hybrid(gen, hybrid, steps)
    if guidance is not None and not gen.classes:
        gen.conditioned(None, 1.0)  # refused with the message for an unconditional generator
    out = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        labels = torch.from_numpy(sample_labels(n, gen.classes)[lo:hi]) if guidance is not None else None
        out.append(sample(gen, list(range(seed + lo, seed + hi)), steps, solver=solver, hybrid=hybrid, labels=labels,
                          guidance=guidance or 0.0).float().cpu())  # fmt: skip
    return torch.cat(out)


def sample_labels(n: int, classes: int) -> np.ndarray:
    """The class of each sample of a conditioned ``sample_generator`` run: i % classes."""
    return np.arange(n) % classes
