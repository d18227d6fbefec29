"""Noise schedules, ODE solvers and consistency sampling: properties first, then agreement
with diffusers' own schedulers on the same network and noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from stages.config import DiffusionConfig
from stages.diffusion.generator import load_generator, save_generator
from stages.diffusion.methods.consistency import student_scheduler
from stages.diffusion.models import build_denoiser
from stages.diffusion.sampling import (
    SampleNoise,
    consistency_timesteps,
    ode_sample,
    ode_timesteps,
    sample,
    sample_generator,
)
from stages.diffusion.schedule import NoiseSchedule
from stages.errors import DistilError
from stages.losses.consistency import l2, pseudo_huber


def _schedule(prediction="v_prediction", betas="squaredcos_cap_v2"):
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule=betas, prediction_type=prediction)
    return s, NoiseSchedule.of(s, "test")


def _gaussian_denoiser(schedule: NoiseSchedule, mu: torch.Tensor, s2: float):
    """The exact network for data N(mu, s2 I): E[x0 | x_t] is linear in x_t."""

    def denoise(x, t):
        a, s = (v.reshape(-1, 1).to(x) for v in schedule.alpha_sigma(t))
        x0 = mu + a * s2 / (a * a * s2 + s * s) * (x - a * mu)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[schedule.prediction]

    return denoise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_invert_the_training_target(prediction):
    _, sch = _schedule(prediction, "linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = sch.add_noise(x0, eps, t)
    x0_hat, eps_hat = sch.x0_eps(sch.target(x0, eps, t), x_t, t)
    assert torch.allclose(x0_hat.float(), x0, atol=1e-3) and torch.allclose(eps_hat.float(), eps, atol=1e-3)


def test_boundary_scalings_fix_f_at_zero_and_hand_over_to_the_network():
    _, sch = _schedule()
    c_skip, c_out = sch.boundary(torch.tensor([0, 1, 999]), 10.0)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2] < 1e-6 and abs(c_out[2] - 1) < 1e-6
    assert torch.allclose(c_skip**2 * 0 + c_skip * 0.25 + c_out**2 * 0.25, torch.full((3,), 0.25, dtype=torch.float64))


def test_trailing_grid_starts_at_the_last_timestep():
    assert ode_timesteps(1000, 1) == [999]
    assert ode_timesteps(1000, 4) == [999, 749, 499, 249]
    assert len(set(ode_timesteps(1000, 1000))) == 1000
    with pytest.raises(DistilError):
        ode_timesteps(1000, 1001)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_solvers_converge_to_the_exact_ode_map_of_gaussian_data(prediction):
    betas = "linear" if prediction == "epsilon" else "squaredcos_cap_v2"
    _, sch = _schedule(prediction, betas)
    mu, s2 = torch.tensor([1.5, -0.5]), 0.3
    denoise = _gaussian_denoiser(sch, mu, s2)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    a, s = (float(v) for v in sch.alpha_sigma(torch.tensor([999])))
    exact = mu + s2**0.5 * (z - a * mu) / (a * a * s2 + s * s) ** 0.5

    def err(steps, solver):
        return float((ode_sample(denoise, sch, z, steps, solver) - exact).norm(dim=1).mean())

    assert err(200, "ddim") < err(20, "ddim") < err(5, "ddim")
    assert err(200, "ddim") < 0.01
    assert 1.7 < err(10, "ddim") / err(20, "ddim") < 2.3  # first order: twice the steps, half the error
    assert err(50, "heun") < err(50, "ddim") / 2.5  # the trapezoid converges faster at equal steps
    assert abs(err(20, "euler") - err(20, "ddim")) < 1e-5  # DDIM is Euler in Karras' variables


def test_ddim_matches_diffusers_ddim_scheduler(tmp_path):
    ddpm, sch = _schedule("v_prediction")
    model = build_denoiser(DiffusionConfig(width=32, depth=1), [2], 0)
    save_generator(tmp_path / "g", model, ddpm)
    gen = load_generator(tmp_path / "g")
    ours = sample(gen, [0, 1, 2, 3], 8, solver="ddim")
    ddim = DDIMScheduler.from_config(ddpm.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ddim.set_timesteps(8)
    assert ddim.timesteps.tolist() == ode_timesteps(1000, 8)
    x = SampleNoise([0, 1, 2, 3], [2]).draw()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(gen.model(x, t).sample, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


def test_consistency_sampling_matches_diffusers_lcm_scheduler(tmp_path):
    ddpm, _ = _schedule("v_prediction")
    model = build_denoiser(DiffusionConfig(width=32, depth=1), [2], 0)
    lcm = student_scheduler(ddpm, 50, 10.0)
    save_generator(tmp_path / "s", model, lcm)
    gen = load_generator(tmp_path / "s")
    assert gen.kind == "consistency"
    for steps in (1, 2, 4):
        ours = sample(gen, [7], steps)
        g = torch.Generator().manual_seed(7)
        x = torch.randn((1, 2), generator=g)
        lcm.set_timesteps(steps)
        assert lcm.timesteps.tolist() == consistency_timesteps(gen, steps)
        with torch.no_grad():
            for t in lcm.timesteps:
                x = lcm.step(gen.model(x, t).sample, t, x, generator=g).prev_sample
        assert torch.allclose(ours, x, atol=1e-5), steps


def test_samples_are_seeded_per_sample_and_batch_independent(tmp_path):
    ddpm, _ = _schedule()
    save_generator(tmp_path / "g", build_denoiser(DiffusionConfig(width=16, depth=1), [2], 0), ddpm)
    whole = sample_generator(tmp_path / "g", 10, 4, seed=5, batch_size=10)
    parts = sample_generator(tmp_path / "g", 10, 4, seed=5, batch_size=3)
    assert torch.allclose(whole, parts, atol=1e-6)  # same noise; only BLAS rounding differs between batch sizes
    shifted = sample_generator(tmp_path / "g", 5, 4, seed=10)
    assert torch.allclose(whole[5:], shifted, atol=1e-6)
    assert not torch.equal(whole[:5], shifted)


def test_sampling_rejects_zero_steps_unknown_solvers_and_bad_hybrids(tmp_path):
    ddpm, _ = _schedule()
    save_generator(tmp_path / "t", build_denoiser(DiffusionConfig(width=16, depth=1), [2], 0), ddpm)
    save_generator(tmp_path / "s", build_denoiser(DiffusionConfig(width=16, depth=1), [2], 0), student_scheduler(ddpm, 50, 10.0))
    with pytest.raises(DistilError, match="at least 1 step"):
        sample_generator(tmp_path / "t", 4, 0, 0)
    with pytest.raises(DistilError, match="unknown solver"):
        sample_generator(tmp_path / "t", 4, 4, 0, solver="rk4")
    with pytest.raises(DistilError, match="steps >= 2"):
        sample_generator(tmp_path / "s", 4, 1, 0, hybrid_first_step_teacher=tmp_path / "t")
    with pytest.raises(DistilError, match="diffusion teacher"):
        sample_generator(tmp_path / "t", 4, 2, 0, hybrid_first_step_teacher=tmp_path / "t")
    hybrid = sample_generator(tmp_path / "s", 4, 2, 0, hybrid_first_step_teacher=tmp_path / "t")
    assert hybrid.shape == (4, 2) and torch.isfinite(hybrid).all()


def test_consistency_losses():
    a = torch.randn(8, 2)
    assert l2(a, a) == 0 and pseudo_huber(a, a) == 0
    b = a + torch.tensor([3.0, 4.0])
    assert torch.isclose(l2(a, b), torch.tensor(12.5))
    assert abs(float(pseudo_huber(a, b, c=1.0)) - (26**0.5 - 1)) < 1e-5
    tiny = a + 1e-6
    assert pseudo_huber(a, tiny) < 1e-8  # quadratic near 0: sqrt(d^2 + c^2) - c ~ d^2 / 2c
