"""``distill --method denoise``: train a diffusion teacher on generator data.

The DDPM objective (Ho et al. 2020, Algorithm 1 / eq. 14, the "simple" loss) with the
target of the chosen parameterisation: t ~ U{0..T-1}, eps ~ N(0, I),
x_t = alpha_t x_0 + sigma_t eps, loss = ||F(x_t, t) - y||^2 with y = eps (``epsilon``),
y = alpha_t eps - sigma_t x_0 (``v_prediction``, Salimans & Ho 2022, section 4) or y = x_0
(``sample``). The noise schedule is a diffusers ``DDPMScheduler`` (cosine or linear betas),
saved with the network; the saved weights are the EMA of the trained ones.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.models import build_denoiser
from stages.diffusion.schedule import BETA_SCHEDULES, PREDICTIONS, NoiseSchedule
from stages.diffusion.training import EMA, fit
from stages.errors import DistilError, one_of


def make_scheduler(cfg: DistillConfig) -> DDPMScheduler:
    d = cfg.diffusion
    one_of("diffusion.prediction", d.prediction, PREDICTIONS)
    one_of("diffusion.beta_schedule", d.beta_schedule, BETA_SCHEDULES)
    if d.train_timesteps < 2:
        raise DistilError(f"diffusion.train_timesteps must be >= 2, got {d.train_timesteps}")
    return DDPMScheduler(num_train_timesteps=d.train_timesteps, beta_schedule=BETA_SCHEDULES[d.beta_schedule],
                         prediction_type=d.prediction, clip_sample=False, timestep_spacing="trailing")  # fmt: skip


def denoise_loss(schedule: NoiseSchedule, classes: int = 0, dropout: float = 0.0):
    """The loss of one batch; with ``classes`` > 0 it takes the batch's labels ``y`` too and
    replaces a ``dropout`` share of them by the null class ``classes`` (Ho & Salimans 2022,
    "Classifier-Free Diffusion Guidance", Algorithm 1: one network learns the conditional and
    the unconditional score, which guidance combines)."""

    def loss(model, x0: torch.Tensor, g: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.randint(0, schedule.T, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = schedule.add_noise(x0, eps, t)
        if classes:
            drop = torch.rand(len(x0), generator=g).to(x0.device) < dropout
            out = model(x_t, t.to(x0.device), class_labels=torch.where(drop, torch.full_like(y, classes), y)).sample
        else:
            out = model(x_t, t.to(x0.device)).sample
        return torch.mean((out - schedule.target(x0, eps, t)) ** 2)

    return loss


@torch.no_grad()
def dev_loss(model, schedule: NoiseSchedule, dev: torch.Tensor, device, seed: int, labels: torch.Tensor | None = None,
             classes: int = 0) -> float:  # fmt: skip
    """The denoising loss on the dev samples with fixed timesteps and noise (comparable across
    epochs); a class-conditional model is scored on the dev labels, none dropped."""
    if len(dev) == 0:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    loss = denoise_loss(schedule, classes)
    return float(loss(model, dev.to(device), g, None if labels is None else labels.to(device)))


def train_labels(data: GeneratorData, classes: int) -> dict[str, torch.Tensor]:
    """The train and dev labels a class-conditional teacher learns from ({} when unconditional), checked."""
    if not classes:
        return {}
    if not data.labels.get("train", np.zeros(0)).size:
        raise DistilError(f"diffusion.classes={classes} trains a class-conditional teacher, but {data.name} has no class "
                          "labels; use labelled data (digits-images) or set diffusion.classes=0")  # fmt: skip
    top = int(max(int(v.max()) for v in data.labels.values() if v.size))
    if top >= classes:
        raise DistilError(f"{data.name} has class {top}, outside diffusion.classes={classes} (labels 0..{classes - 1}): "
                          f"set diffusion.classes={top + 1}")  # fmt: skip
    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in data.labels.items() if v.size}


def train(cfg: DistillConfig, data: GeneratorData, teacher, work, *, device, bar, live):
    """(model to save, its scheduler, summary)."""
    if teacher is not None:
        raise DistilError("method 'denoise' trains a teacher from data; drop --teacher")
    scheduler = make_scheduler(cfg)
    schedule = NoiseSchedule.of(scheduler, "denoise")
    classes = cfg.diffusion.classes
    labels = train_labels(data, classes)
    model = build_denoiser(cfg.diffusion, data.sample_shape, cfg.seed, classes=classes).to(device)
    ema = EMA(model, cfg.diffusion.ema, warmup=True)
    dev = data.split("dev")

    def on_epoch(epoch: int) -> dict[str, float]:
        if not len(dev):
            return {}
        return {"dev_loss": dev_loss(ema.model, schedule, dev, device, cfg.seed + 7, labels.get("dev"), classes)}

    progress = fit(model, ema, data.split("train"), cfg, work, denoise_loss(schedule, classes, cfg.diffusion.label_dropout),
                   device=device, label="denoise", bar=bar, live=live, on_epoch=on_epoch, labels=labels.get("train"))  # fmt: skip
    summary = {"prediction": cfg.diffusion.prediction, "beta_schedule": cfg.diffusion.beta_schedule,
               **({"classes": classes, "label_dropout": cfg.diffusion.label_dropout} if classes else {}),
               "epochs": progress["epoch"], "train_seconds": progress["seconds"], "history": progress["history"]}  # fmt: skip
    return ema.model, scheduler, summary
