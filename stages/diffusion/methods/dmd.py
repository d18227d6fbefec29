"""``distill --method dmd``: a one-step generator by distribution matching distillation.

Yin et al., "One-step Diffusion with Distribution Matching Distillation" (CVPR 2024):

- the generator G(z) maps noise to a sample in one step: here the student network read as a
  consistency function at the top timestep, x = f(z, T - 1) (``consistency_fn``), so it is saved
  and sampled like a 1-step consistency student (an ``LCMScheduler``);
- **distribution matching** (eq. 7-8): for x = G(z) noised to x_t at t ~ U[0.02 T, 0.98 T], the
  gradient of KL(p_fake || p_real) with respect to x is, up to the per-sample weight
  1 / mean|x - mu_real(x_t)|, mu_fake(x_t) - mu_real(x_t), with mu the data predictions of the
  frozen teacher (the real score) and of a fake score network trained on the generator's own
  samples; it reaches G through 0.5 ||x - sg(x - grad)||^2 (the form of the authors' DMD2 code);
- **regression** (eq. 9): ``dmd_pairs`` noise vectors and the teacher's ``eval_steps``-step DDIM
  solutions from them, computed once; weight ``dmd_regression`` (lambda_reg = 0.25), with mean
  squared error where the paper uses LPIPS;
- **fake score** (eq. 6): the teacher's denoising loss on generator samples (detached),
  ``dmd_fake_steps`` updates per generator step, its own AdamW at the student's learning rate;
  it starts from the teacher, as the generator does.

The fake network and its optimiser are checkpointed with the generator (``fit``'s ``aux``).
"""

from __future__ import annotations

import copy

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods.denoise import denoise_loss
from stages.diffusion.sampling import SampleNoise, consistency_fn, ode_sample
from stages.diffusion.students import Probe, averages, check_student, init_student, load_teacher, net, student_scheduler
from stages.diffusion.training import fit
from stages.errors import DistilError

PAIR_SEED = 2_000_000_011
"""Noise seeds of the regression pairs: apart from sampling's and the probe's."""


def matching_gradient(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample normalised gradient (mu_fake - mu_real) / mean|x - mu_real| (eq. 8)."""
    dims = tuple(range(1, x.ndim))
    weight = 1.0 / (x - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    return (fake - real) * weight


def fake_score(teacher, cfg: DistillConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The trained fake score (DMD eq. 6) started from the teacher, and its own AdamW at the student's rate."""
    fake = copy.deepcopy(teacher.model).train().requires_grad_(True)
    return fake, torch.optim.AdamW(fake.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(generator to save, its LCMScheduler, summary)."""
    teacher = load_teacher(teacher_path, data, device, "dmd", unconditional=True)
    schedule, d = teacher.schedule, cfg.diffusion
    check_student(cfg)
    if d.skip < 1 or schedule.T % d.skip:
        raise DistilError(f"diffusion.skip must be >= 1 and divide the teacher's {schedule.T} timesteps, got {d.skip}")
    top = schedule.T - 1
    generator = init_student(cfg, teacher, data, device)
    target, sampler = averages(cfg, generator)
    saved = sampler or target
    fake, fake_opt = fake_score(teacher, cfg)
    probe = Probe(teacher, cfg, device)
    z_ref = SampleNoise(range(PAIR_SEED, PAIR_SEED + d.dmd_pairs), teacher.sample_shape).draw().to(device)
    with torch.no_grad():
        y_ref = ode_sample(teacher.denoise, schedule, z_ref, d.eval_steps, "ddim")
    fake_loss = denoise_loss(schedule)
    lo, hi = int(0.02 * schedule.T), max(int(0.98 * schedule.T), int(0.02 * schedule.T) + 1)
    seen = {"dm": [], "reg": [], "fake": []}

    def one_step(model, z: torch.Tensor) -> torch.Tensor:
        return consistency_fn(net(model), schedule, z, torch.full((len(z),), top, dtype=torch.long), d.timestep_scaling)

    def loss(model, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = len(x0)
        x = one_step(model, torch.randn(x0.shape, generator=g).to(x0.device))
        t = torch.randint(lo, hi, (b,), generator=g)
        x_t = schedule.add_noise(x.detach(), torch.randn(x.shape, generator=g).to(x.device), t)
        with torch.no_grad():
            real, _ = schedule.x0_eps(teacher.denoise(x_t, t), x_t, t)
            mu_fake, _ = schedule.x0_eps(fake(x_t, t.to(x.device)).sample, x_t, t)
            grad = matching_gradient(x.double(), real, mu_fake).to(x.dtype)
        dm = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())
        pick = torch.randint(0, len(z_ref), (b,), generator=g)
        reg = torch.nn.functional.mse_loss(one_step(model, z_ref[pick]), y_ref[pick])
        for _ in range(d.dmd_fake_steps):  # the fake score follows the generator's current samples
            f = fake_loss(fake, x.detach(), g)
            fake_opt.zero_grad(set_to_none=True)
            f.backward()
            fake_opt.step()
        seen["dm"].append(float(dm.detach()))
        seen["reg"].append(float(reg.detach()))
        seen["fake"].append(float(f.detach()))
        return dm + d.dmd_regression * reg

    @torch.no_grad()
    def paired_error(epoch: int | None = None) -> dict[str, float]:
        return {"paired_error": probe(one_step(saved.model, probe.z))}

    initial = paired_error()["paired_error"]
    progress = fit(generator, target, data.split("train"), cfg, work, loss, device=device, label="dmd", bar=bar, live=live,
                   on_epoch=paired_error, sampler=sampler, aux={"fake": fake, "fake_optimizer": fake_opt})  # fmt: skip
    history = progress["history"]
    tenth = max(1, len(seen["dm"]) // 10)
    summary = {
        "teacher": teacher.identity(), "regression_weight": d.dmd_regression, "regression_pairs": d.dmd_pairs,
        "fake_steps": d.dmd_fake_steps, "target_ema": d.target_ema, "epochs": progress["epoch"],
        "train_seconds": progress["seconds"], "paired_error_initial": initial,
        "paired_error_final": history[-1]["paired_error"] if history else initial,
        "paired_error_teacher_1step": probe.teacher_error(1), "paired_error_reference_steps": d.eval_steps,
        **{f"{k}_loss_last": sum(v[-tenth:]) / tenth for k, v in seen.items() if v}, "history": history,
    }  # fmt: skip
    return saved.model, student_scheduler(teacher.scheduler, schedule.T // d.skip, d.timestep_scaling), summary
