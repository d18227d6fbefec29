"""``distill --method phased-dmd``: a few-step generator by distribution matching, one expert per phase.

Fan et al., "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within
Subintervals" (2025):

- **phases** (section 3.2): the teacher's timesteps are cut at the trailing grid of K =
  ``diffusion.phases`` steps, e_0 = -1 < e_1 < ... < e_K = T - 1 (``multistep``'s boundaries), and
  phase k maps x at e_k to the sample at e_{k-1} with one DDIM step of its own expert,
  x_{e_{k-1}} = alpha x0_hat + sigma eps_hat (``TimestepExperts``: the Mixture-of-Experts of the
  paper, one network per SNR subinterval). Sampling is those K DDIM steps along the boundaries:
  diffusers' ``DDIMScheduler`` with ``set_timesteps(K)``, which the generator is saved with.
- **progressive distribution matching**: the phases are trained one after another, from the
  noisiest, each for 1 / K of the optimiser steps; phase k's input is what the experts before it
  make from fresh noise (no gradient), and its output x_s (s = e_{k-1}) is matched to the
  teacher's marginal at s. The DMD gradient (Yin et al. 2024, eq. 7-8) is taken on x_s diffused to
  any t above s, t in (s, 0.98 T] ((t_k, 1] in the paper's notation; LightX2V's public phased-DMD
  trainer matches its last phase at both the low and the high levels too), by the forward
  transition x_t = (alpha_t / alpha_s) x_s + sigma_{t|s} z, sigma_{t|s}^2 = sigma_t^2 - (alpha_t /
  alpha_s)^2 sigma_s^2: alpha_s (mu_fake - mu_real), normalised per sample by DMD's
  1 / mean|x0_hat - mu_real| (x0_hat the expert's own data prediction). So the last phase (s = -1,
  alpha 1) is DMD exactly, over DMD's whole range t in [0.02 T, 0.98 T]: its clean sample is still
  matched at the high noise levels that decide layout, where an earlier phase's errors show.
  (Matching it only below e_1, within its own phase, left those errors uncorrected: FD 12.55 at
  2 steps on digits, against 4.27 now and ``dmd``'s 2.58; README, 3 seeds);
- **score matching within subintervals** (section 3.3): the fake score sees x_t made from x_s, not
  from clean data, so its data-prediction target is the one whose score is the conditional score of
  x_t given x_s (Tweedie's formula at both levels): y = (x_t + (sigma_t^2 / sigma_{t|s}^2)
  ((alpha_t / alpha_s) x_s - x_t)) / alpha_t, unbiased for E[x_0 | x_t] under the generator's
  marginal, learnt in the network's own prediction type. t keeps a twentieth of the phase
  away from s, where sigma_{t|s} vanishes and the target's variance explodes;
- **regression** (DMD eq. 9, as ``dmd``): each phase also maps the teacher's ODE trajectory point
  at e_k (from ``dmd_pairs`` fixed noise vectors, ``eval_steps`` DDIM steps in all) to its point at
  e_{k-1}, weight ``dmd_regression``. The paper trains without it; it is kept so ``dmd`` and
  ``phased-dmd`` differ only in the phases.

The fake score (one network, each phase training it at the levels above its end) and its optimiser are
checkpointed with the generator (``fit``'s ``aux``); the phase follows from the optimiser steps
taken, so a resumed run continues in the right phase.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods.dmd import PAIR_SEED, fake_score
from stages.diffusion.models import TimestepExperts
from stages.diffusion.sampling import SampleNoise, ode_step, ode_timesteps
from stages.diffusion.schedule import NoiseSchedule, bcast
from stages.diffusion.students import Probe, averages, check_student, ddim_scheduler, init_student, load_teacher, net
from stages.diffusion.training import fit, plan
from stages.errors import DistilError


def phase_bounds(T: int, phases: int) -> list[int]:
    """e_0 = -1 < e_1 < ... < e_K = T - 1: the phases' ends, on the trailing grid of K steps."""
    if phases < 1 or T % phases:
        raise DistilError(f"diffusion.phases must be >= 1 and divide the teacher's {T} timesteps, got {phases}")
    return [-1, *reversed(ode_timesteps(T, phases))]


def matching_levels(T: int, t_in: int, s: int) -> tuple[int, int]:
    """[low, high]: the timesteps at which a phase's output at s (from input at ``t_in``) meets the
    teacher: every level above s that DMD uses (t in [0.02 T, 0.98 T]), and for s >= 0 a twentieth
    of the phase above s, where sigma_{t|s} vanishes. The last phase (s = -1) gets DMD's range."""
    lo, hi = int(0.02 * T), int(0.98 * T)
    return (lo, hi) if s < 0 else (min(hi, max(s + 1 + (t_in - s) // 20, lo)), hi)


def transition(schedule: NoiseSchedule, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t / alpha_s, sigma_{t|s}) float64 [B] of q(x_t | x_s) for s < t."""
    a_s, s_s = schedule.alpha_sigma(s)
    a_t, s_t = schedule.alpha_sigma(t)
    ratio = a_t / a_s
    return ratio, (s_t**2 - ratio**2 * s_s**2).clamp_min(1e-12).sqrt()


def subinterval_target(schedule: NoiseSchedule, x_s: torch.Tensor, x_t: torch.Tensor, s: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The data-prediction target at x_t made from x_s (Phased DMD, section 3.3), float64."""
    ratio, sig_ts = (bcast(v, x_t).to(x_t.device) for v in transition(schedule, s, t))
    a_t, s_t = (bcast(v, x_t).to(x_t.device) for v in schedule.alpha_sigma(t))
    x_t, x_s = x_t.double(), x_s.double()
    return (x_t + (s_t**2 / sig_ts**2) * (ratio * x_s - x_t)) / a_t


def ddim_between(denoise, schedule: NoiseSchedule, x: torch.Tensor, hi: int, lo: int, steps: int) -> torch.Tensor:
    """``steps`` DDIM steps of ``denoise`` from timestep ``hi`` down to ``lo`` (-1: the clean end)."""
    grid = torch.linspace(hi, lo, steps + 1).round().long().tolist()
    for t, s in zip(grid, grid[1:], strict=False):
        x = ode_step(denoise, schedule, x, torch.full((len(x),), t), torch.full((len(x),), s), "ddim")
    return x


@torch.no_grad()
def boundary_path(teacher, bounds: list[int], z: torch.Tensor, per_phase: int) -> list[torch.Tensor]:
    """The teacher's DDIM trajectory from noise ``z`` at every phase boundary, from the top down
    (``per_phase`` steps within each phase): the regression's inputs and targets."""
    path = [z]
    for k in range(len(bounds) - 1, 0, -1):
        path.append(ddim_between(teacher.denoise, teacher.schedule, path[-1], bounds[k], bounds[k - 1], per_phase))
    return path


def fake_step(fake, opt, schedule: NoiseSchedule, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
              z: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One update of the fake score on x_s diffused to t with noise z, towards the subinterval
    target in its own prediction type; returns the loss."""
    ratio, sig_ts = (bcast(v, x_s).to(x_s.device) for v in transition(schedule, s, t))
    a_t, s_t = (bcast(v, x_s).to(x_s.device) for v in schedule.alpha_sigma(t))
    x_t = (ratio * x_s.double() + sig_ts * z.double()).to(x_s.dtype)
    y = subinterval_target(schedule, x_s, x_t, s, t)
    eps_y = (x_t.double() - a_t * y) / s_t
    loss = torch.mean((fake(x_t, t.to(x_s.device)).sample - schedule.target(y, eps_y, t).to(x_s.dtype)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(the phase experts as one network, their DDIMScheduler, summary)."""
    teacher = load_teacher(teacher_path, data, device, "phased-dmd", unconditional=True)
    schedule, d = teacher.schedule, cfg.diffusion
    check_student(cfg)
    K, bounds = d.phases, phase_bounds(schedule.T, d.phases)
    if K < 2:
        raise DistilError("phased-dmd needs diffusion.phases >= 2 (one phase is --method dmd)")
    generator = TimestepExperts.of(init_student(cfg, teacher, data, device), bounds[1:-1][::-1])
    target, sampler = averages(cfg, generator)
    saved = sampler or target
    fake, fake_opt = fake_score(teacher, cfg)
    probe = Probe(teacher, cfg, device)
    z = SampleNoise(range(PAIR_SEED, PAIR_SEED + d.dmd_pairs), teacher.sample_shape).draw().to(device)
    path = boundary_path(teacher, bounds, z, max(1, d.eval_steps // K))
    _, per_epoch, epochs = plan(cfg, len(data.split("train")))
    total = epochs * per_epoch
    seen: dict[str, list[float]] = {}

    def phase_of(step: int) -> int:
        """0 for the noisiest phase (e_K -> e_{K-1}) ... K - 1 for the last (e_1 -> clean)."""
        return min(K - 1, step * K // total)

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = phase_of(target.updates)
        t_in, s_end = bounds[K - p], bounds[K - p - 1]
        b = len(x0)
        x = torch.randn(x0.shape, generator=g).to(x0.device)
        with torch.no_grad():  # the finished phases, from fresh noise
            for q in range(p):
                x = ode_step(
                    net(model), schedule, x, torch.full((b,), bounds[K - q]), torch.full((b,), bounds[K - q - 1]), "ddim"
                )
        t_col, s_col = torch.full((b,), t_in), torch.full((b,), s_end)
        out = net(model)(x, t_col)
        x0_hat, eps_hat = schedule.x0_eps(out, x, t_col)
        a_s, sig_s = (bcast(v, x).to(x.device) for v in schedule.alpha_sigma(s_col))
        x_s = (a_s * x0_hat + sig_s * eps_hat).to(x.dtype)
        low, high = matching_levels(schedule.T, t_in, s_end)
        t = torch.randint(low, high + 1, (b,), generator=g)
        ratio, sig_ts = (bcast(v, x).to(x.device) for v in transition(schedule, s_col, t))
        x_t = (ratio * x_s.detach().double() + sig_ts * torch.randn(x.shape, generator=g).to(x.device).double()).to(x.dtype)
        with torch.no_grad():
            real, _ = schedule.x0_eps(teacher.denoise(x_t, t), x_t, t)
            mu_fake, _ = schedule.x0_eps(fake(x_t, t.to(x.device)).sample, x_t, t)
            dims = tuple(range(1, x.ndim))
            weight = 1.0 / (x0_hat.detach() - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
            grad = (a_s * (mu_fake - real) * weight).to(x.dtype)
        dm = 0.5 * torch.nn.functional.mse_loss(x_s, (x_s - grad).detach())
        pick = torch.randint(0, len(z), (b,), generator=g)
        start, end = path[p][pick], path[p + 1][pick]
        reg = torch.nn.functional.mse_loss(ode_step(net(model), schedule, start, t_col, s_col, "ddim"), end)
        for _ in range(d.dmd_fake_steps):  # the fake score of this phase's samples, within its subinterval
            f = fake_step(fake, fake_opt, schedule, x_s.detach(), s_col, t, torch.randn(x.shape, generator=g).to(x.device))
        for key, v in (("dm", dm), ("reg", reg), ("fake", f)):
            seen.setdefault(f"phase{p + 1}_{key}", []).append(float(v.detach()))
        return dm + d.dmd_regression * reg

    @torch.no_grad()
    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": probe(probe.ddim(net(saved.model), K)), "phase": phase_of(max(target.updates - 1, 0)) + 1}

    initial = paired_error()["paired_error"]
    progress = fit(generator, target, data.split("train"), cfg, work, loss, device=device, label="phased-dmd", bar=bar,
                   live=live, on_epoch=paired_error, sampler=sampler, aux={"fake": fake, "fake_optimizer": fake_opt})  # fmt: skip
    history = progress["history"]
    summary = {
        "teacher": teacher.identity(), "phases": K, "boundaries": bounds, "sampling_steps": K,
        "regression_weight": d.dmd_regression, "regression_pairs": d.dmd_pairs, "fake_steps": d.dmd_fake_steps,
        "epochs": progress["epoch"], "train_seconds": progress["seconds"], "paired_error_initial": initial,
        "paired_error_final": history[-1]["paired_error"] if history else initial,
        f"paired_error_teacher_{K}step": probe.teacher_error(K), "paired_error_reference_steps": d.eval_steps,
        **{f"{k}_loss_last": sum(v[-max(1, len(v) // 10):]) / max(1, len(v) // 10) for k, v in seen.items()}, "history": history,
    }  # fmt: skip
    return saved.model, ddim_scheduler(teacher.scheduler), summary
