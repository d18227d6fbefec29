"""``distill --method cfg-distill``: a student that alone gives a class-conditional teacher's
classifier-free-guided prediction, for a range of guidance weights.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023), stage one (section 4.1,
eq. 6): the student x_eta(z_t, w) is trained to match the teacher's guided prediction
(1 + w) x_c(z_t) - w x(z_t) at t ~ U, z_t noised from a data sample, w drawn from the range the
student serves, with w an input of the student; Cideron et al., "Diversity-Rewarded CFG
Distillation" (2024) distil the same guided target into the model, w included. Sampling the
student costs one network call per step where CFG costs two.

Here w takes the values of ``diffusion.guidance_weights`` (Meng et al. embed a continuous w),
each a condition of its own: the student's class embedding holds one copy of the teacher's
(K + 1 classes, the last the null class) per weight, condition index ``g (K + 1) + c``, and
starts from the teacher with every copy equal to the teacher's embedding. A ``label_dropout``
share of the rows trains the null class on the teacher's unconditional prediction. The
student is the teacher's architecture and schedule, sampled by the same ODE solvers; its
weights and classes go to ``guidance.json`` (``stages.diffusion.generator.GUIDED``).

``diffusion.diversity`` > 0 adds ``diversity_penalty`` with that weight: the similarity of two
one-step predictions of the same condition from different noise, which the student lowers.
Students trained with and without it are the quality- and diversity-tuned pair whose weights
``evaluate``'s ``merge`` interpolates (Cideron et al., section 4: model merging of the two).
"""

from __future__ import annotations

import copy

import torch

from stages.config import DistillConfig
from stages.diffusion.data import GeneratorData
from stages.diffusion.methods.denoise import train_labels
from stages.diffusion.models import MLPDenoiser
from stages.diffusion.students import load_teacher
from stages.diffusion.training import EMA, fit
from stages.errors import DistilError


def guided_target(teacher, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, w: torch.Tensor, null: int) -> torch.Tensor:
    """(1 + w) F(x_t, c) - w F(x_t, null) per row (w [B]); rows whose c is the null class get F(x_t, null)."""
    with torch.no_grad():
        nul = torch.full_like(c, null)
        uncond = teacher(x_t, t, class_labels=nul).sample
        cond = teacher(x_t, t, class_labels=c).sample
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        guided = (1 + w.view(shape)) * cond - w.view(shape) * uncond
        return torch.where((c == null).view(shape), uncond, guided)


def widen(teacher: torch.nn.Module, groups: int) -> torch.nn.Module:
    """A copy of the class-conditional ``teacher`` whose class embedding has ``groups`` copies of the teacher's."""
    old = teacher.class_embedding.weight.detach()
    if isinstance(teacher, MLPDenoiser):
        config = {**teacher.config, "num_classes": groups * old.shape[0] - 1}
    else:
        config = {**teacher.config, "num_class_embeds": groups * old.shape[0]}
    student = type(teacher).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("class_embedding.")}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise DistilError(f"cfg-distill could not copy the teacher into the student ({missing[:3]}, {unexpected[:3]})")
    with torch.no_grad():
        student.class_embedding.weight.copy_(old.repeat(groups, 1))
    return student.to(old.device).train().requires_grad_(True)


def diversity_penalty(model, schedule, shape: torch.Size, y: torch.Tensor, gi: torch.Tensor, classes: int,
                      g: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Mean cosine similarity of two one-step data predictions x0_hat(z, T - 1) of the same
    (class, weight) condition from independent noise z1, z2, each centred on the batch's mean
    prediction: the diversity term (after Cideron et al., section 3, whose reward is the
    dissimilarity of two generations of the same prompt; here it is differentiable, so it is a
    loss term rather than a reward for reinforcement learning)."""
    b, device = len(y), y.device
    t = torch.full((2 * b,), schedule.T - 1, dtype=torch.long)
    z = torch.randn((2 * b, *shape), generator=g).to(device)
    cond = (gi * (classes + 1) + y).repeat(2)
    x0, _ = schedule.x0_eps(model(z, t.to(device), class_labels=cond).sample, z, t)
    flat = x0.float().flatten(1)
    flat = flat - flat.mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(flat[:b], flat[b:], dim=1).mean()


def cfg_loss(teacher, schedule, weights: torch.Tensor, classes: int, dropout: float, diversity: float = 0.0):
    def loss(model, x0: torch.Tensor, g: torch.Generator, y: torch.Tensor) -> torch.Tensor:
        b, device = len(x0), x0.device
        t = torch.randint(0, schedule.T, (b,), generator=g).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        gi = torch.randint(0, len(weights), (b,), generator=g).to(device)
        drop = (torch.rand(b, generator=g) < dropout).to(device)
        c = torch.where(drop, torch.full_like(y, classes), y)
        x_t = schedule.add_noise(x0, eps, t.cpu())
        target = guided_target(teacher, x_t, t, c, weights.to(device)[gi], classes)
        out = model(x_t, t, class_labels=gi * (classes + 1) + c).sample
        mse = torch.mean((out - target) ** 2)
        if not diversity:
            return mse
        return mse + diversity * diversity_penalty(model, schedule, x0.shape[1:], y, gi, classes, g)

    return loss


def train(cfg: DistillConfig, data: GeneratorData, teacher_path, work, *, device, bar, live):
    """(student, the teacher's scheduler, summary with ``guided``: the student's conditions)."""
    teacher = load_teacher(teacher_path, data, device, "cfg-distill")
    if not teacher.classes:
        raise DistilError(f"cfg-distill distils classifier-free guidance: teacher {teacher_path} is unconditional; train one "
                          "with --method denoise --set diffusion.classes=K")  # fmt: skip
    if teacher.weights:
        raise DistilError(f"teacher {teacher_path} is already a cfg-distill student; distil from the class-conditional teacher")
    grid = [float(w) for w in cfg.diffusion.guidance_weights]
    if not grid or len(set(grid)) != len(grid):
        raise DistilError(f"diffusion.guidance_weights must be distinct weights >= 0, got {grid}")
    classes = teacher.classes
    labels = train_labels(data, classes)
    student = widen(teacher.model, len(grid))
    ema = EMA(student, cfg.diffusion.ema, warmup=True)
    loss = cfg_loss(copy.deepcopy(teacher.model).eval(), teacher.schedule, torch.tensor(grid), classes, cfg.diffusion.label_dropout,
                    cfg.diffusion.diversity)  # fmt: skip
    progress = fit(student, ema, data.split("train"), cfg, work, loss, device=device, label="cfg-distill", bar=bar, live=live,
                   labels=labels["train"])  # fmt: skip
    summary = {"teacher": teacher.identity(), "guided": {"classes": classes, "weights": grid}, "diversity": cfg.diffusion.diversity,
               "epochs": progress["epoch"], "train_seconds": progress["seconds"], "history": progress["history"]}  # fmt: skip
    return ema.model, teacher.scheduler, summary
