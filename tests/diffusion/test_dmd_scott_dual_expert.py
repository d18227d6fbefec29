"""Three students of a diffusion teacher from the second wave. ``dmd``: the distribution-matching
gradient against a hand computation, a one-step generator that moves toward the teacher, its fake
score checkpointed so a killed run resumes to identical weights. ``scott``: the SDE step is DDIM
at eta 0 and the DDPM posterior at eta 1, and the student trains through it. ``dual-expert``: rows
routed to the expert of their timestep, two experts that learn their own halves. And refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOONS_DATA_SIZES, MOONS_NET, resumes_like_uninterrupted

from stages import distill
from stages.config import DataConfig, DiffusionConfig, DistillConfig
from stages.diffusion.methods.dmd import matching_gradient
from stages.diffusion.sampling import sample_generator
from stages.errors import DistilError

DATA = DataConfig(sizes=MOONS_DATA_SIZES)
NET = MOONS_NET


def _dmd(**extra) -> DistillConfig:
    d = DiffusionConfig(**NET, skip=20, eval_samples=64, eval_steps=10, dmd_pairs=64, target_ema=0.5)
    return DistillConfig(method="dmd", diffusion=d, steps=24, batch_size=64, lr=0.0005, **extra)


def test_the_matching_gradient_is_the_normalised_score_difference():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    fake = torch.tensor([[2.0, 2.0], [1.0, 3.0]])
    got = matching_gradient(x, real, fake)
    assert torch.allclose(got, torch.tensor([[2.0 / 0.5, 0.0], [0.0, 2.0 / 1.0]]))  # (fake - real) / mean|x - real|


def test_a_one_step_generator_moves_toward_the_teacher_and_samples_in_one_step(moons_teacher, tmp_path):
    distill.run(_dmd(), "moons", tmp_path / "g", data_cfg=DATA, teachers=[moons_teacher], progress=False)
    summary = json.loads((tmp_path / "g" / "training.json").read_text())
    assert summary["paired_error_final"] < summary["paired_error_initial"]
    assert summary["paired_error_final"] < summary["paired_error_teacher_1step"]
    assert {"dm_loss_last", "reg_loss_last", "fake_loss_last"} <= set(summary)
    x = sample_generator(tmp_path / "g", 16, 1, 0)
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_dmd_resumes_like_an_uninterrupted_run_fake_score_included(moons_teacher, tmp_path):
    resumes_like_uninterrupted(lambda out: distill.run(_dmd(), "moons", out, data_cfg=DATA, teachers=[moons_teacher], progress=False),
                               tmp_path)


def test_dmd_refuses_a_conditional_teacher_and_a_bad_skip(tmp_path):
    from diffusers import DDPMScheduler

    from stages.diffusion.generator import save_generator
    from stages.diffusion.models import build_denoiser

    cond = tmp_path / "cond"
    save_generator(cond, build_denoiser(DiffusionConfig(width=8, depth=1), [2], 0, classes=3), DDPMScheduler(num_train_timesteps=20))
    with pytest.raises(DistilError, match="class-conditional"):
        distill.run(_dmd(), "moons", tmp_path / "g", data_cfg=DATA, teachers=[cond], progress=False)
    plain = tmp_path / "plain"
    save_generator(plain, build_denoiser(DiffusionConfig(width=8, depth=1), [2], 0), DDPMScheduler(num_train_timesteps=30))
    with pytest.raises(DistilError, match="divide"):
        distill.run(_dmd(), "moons", tmp_path / "g2", data_cfg=DATA, teachers=[plain], progress=False)


# ---- scott: consistency distillation with a stochastic teacher step ---------------------


def _schedule():
    from diffusers import DDPMScheduler

    from stages.diffusion.schedule import NoiseSchedule

    return NoiseSchedule.of(DDPMScheduler(num_train_timesteps=100, prediction_type="epsilon"), "test")


def test_the_sde_step_is_ddim_at_eta_0_and_the_ddpm_posterior_at_eta_1():
    from stages.diffusion.sampling import ode_step, sde_step

    schedule = _schedule()
    g = torch.Generator().manual_seed(0)
    x, eps_hat, z = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t, s = torch.full((5,), 60), torch.full((5,), 40)
    denoise = lambda x_, t_: eps_hat  # noqa: E731  (an epsilon-predicting model)
    assert torch.allclose(sde_step(denoise, schedule, x, t, s, 0.0, z), ode_step(denoise, schedule, x, t, s, "ddim"))
    (a_t, s_t), (a_s, s_s) = (tuple(v[0].double() for v in schedule.alpha_sigma(u)) for u in (t, s))
    abar_t, abar_s = a_t**2, a_s**2
    beta = 1 - abar_t / abar_s
    x0 = (x - s_t * eps_hat) / a_t
    mean = (a_s * beta / (1 - abar_t)) * x0 + ((abar_t / abar_s).sqrt() * (1 - abar_s) / (1 - abar_t)) * x
    var = (1 - abar_s) / (1 - abar_t) * beta
    assert torch.allclose(sde_step(denoise, schedule, x, t, s, 1.0, z), mean + var.sqrt() * z, atol=1e-10)


def test_scott_distils_a_one_step_student_through_stochastic_teacher_steps(moons_teacher, tmp_path):
    cfg = DistillConfig(method="scott", diffusion=DiffusionConfig(**NET, skip=20, eval_samples=64, eval_steps=10,
                                                                  noise_strength=0.5), steps=24, batch_size=64, lr=0.0005)  # fmt: skip
    distill.run(cfg, "moons", tmp_path / "s", data_cfg=DATA, teachers=[moons_teacher], progress=False)
    summary = json.loads((tmp_path / "s" / "training.json").read_text())
    assert summary["method"] == "scott" and summary["noise_strength"] == 0.5 and summary["solver"] == "sde"
    assert summary["paired_error_final"] < summary["paired_error_initial"]
    assert torch.isfinite(sample_generator(tmp_path / "s", 8, 2, 0)).all()
    with pytest.raises(DistilError, match="noise_strength"):
        from stages.config import from_dict

        from_dict(DiffusionConfig, {"noise_strength": 1.5}, "diffusion")


# ---- dual-expert: a semantic and a detail expert chosen by timestep ----------------------


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_timestep_experts_route_each_row_to_its_expert(arch, tmp_path):
    from diffusers import DDPMScheduler

    from stages.diffusion.generator import load_generator, save_generator
    from stages.diffusion.models import TimestepExperts, build_denoiser

    shape = [2] if arch == "mlp" else [1, 8, 8]
    base = build_denoiser(DiffusionConfig(arch=arch, width=8, depth=1, channels=[8, 16], norm_groups=4), shape, 0)
    experts = TimestepExperts.of(base, [30, 10])
    with torch.no_grad():
        for i, e in enumerate(experts.experts):
            next(e.parameters()).add_(0.5 * i)  # tell the three apart
    save_generator(tmp_path / "g", experts, DDPMScheduler(num_train_timesteps=50))
    experts = load_generator(tmp_path / "g").model  # and it survives the round trip
    x, t = torch.randn(6, *shape), torch.tensor([3, 10, 11, 30, 31, 40])
    out = experts(x, t).sample
    for rows, i in ((slice(0, 2), 2), (slice(2, 4), 1), (slice(4, 6), 0)):  # t <= 10, 10 < t <= 30, t > 30
        assert torch.allclose(out[rows], experts.experts[i](x[rows], t[rows]).sample)
    with pytest.raises(DistilError, match="decreasing"):
        TimestepExperts.of(base, [10, 30])


def test_dual_expert_trains_two_experts_that_sample_along_the_segments(moons_teacher, tmp_path):
    from stages.diffusion.generator import load_generator

    cfg = DistillConfig(method="dual-expert", diffusion=DiffusionConfig(**NET, segments=2, skip=10, eval_samples=64,
                                                                        eval_steps=10), steps=24, batch_size=64, lr=0.0005)  # fmt: skip
    distill.run(cfg, "moons", tmp_path / "s", data_cfg=DATA, teachers=[moons_teacher], progress=False)
    summary = json.loads((tmp_path / "s" / "training.json").read_text())
    assert summary["expert_split"] == summary["boundaries"][1] and summary["paired_error_final"] < summary["paired_error_initial"]
    model = load_generator(tmp_path / "s").model
    sem, det = (e.state_dict() for e in model.experts)
    assert any(not torch.equal(sem[k], det[k]) for k in sem)  # each learnt its own half
    assert torch.isfinite(sample_generator(tmp_path / "s", 8, 2, 0)).all()
    with pytest.raises(DistilError, match="segments >= 2"):
        distill.run(DistillConfig(method="dual-expert", diffusion=DiffusionConfig(**NET, segments=1)), "moons", tmp_path / "x",
                    data_cfg=DATA, teachers=[moons_teacher], progress=False)  # fmt: skip
