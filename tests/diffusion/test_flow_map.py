"""``flow-map``: the map's boundary condition, the Lagrangian residual against a hand derivative, the
exact map of a known flow scoring zero on both terms, a map trained on moons whose one-step samples
approach the data and that reloads (distil's sampler and the diffusers pipeline, MLP and U-Net), a
killed run resumed exactly, and the places a flow map is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import resumes_like_uninterrupted
from diffusers.models.unets.unet_2d import UNet2DOutput

from stages import distill, generate_teacher_data
from stages.config import DataConfig, DiffusionConfig, DistillConfig, GenerateTeacherDataConfig
from stages.diffusion.methods.flow_map import H, T, lagrangian_residual
from stages.diffusion.sampling import flow_map_fn, sample_generator
from stages.errors import DistilError

DATA = DataConfig(sizes=[512, 64, 256])
NET = {"width": 32, "depth": 1, "checkpoint_every": 1}


class Toy(torch.nn.Module):
    """u(x, sigma, tau) = x * f(sigma, tau), the times read back from the network's T-scaled inputs."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t, class_labels=None):
        sigma, tau = (v.double() / T for v in (t, class_labels))
        return UNet2DOutput(sample=x * self.f(sigma, tau).to(x).reshape(-1, *[1] * (x.ndim - 1)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "m"
    d = DiffusionConfig(width=64, depth=2, ema=0.9, checkpoint_every=100)  # 1-jump quality dips, then recovers by ~300 steps
    distill.run(DistillConfig(method="flow-map", diffusion=d, steps=300, batch_size=128, lr=0.003), "moons", out, data_cfg=DATA,
                progress=False)  # fmt: skip
    return out


def test_the_map_is_the_identity_on_the_diagonal():
    from stages.diffusion.models import build_denoiser

    net = build_denoiser(DiffusionConfig(width=16, depth=1), [2], 0, two_times=True)
    x, s = torch.randn(5, 2), torch.rand(5, dtype=torch.float64)
    assert torch.equal(flow_map_fn(net, T, x, s, s), x)


def test_the_lagrangian_residual_is_the_tau_derivative_minus_the_velocity_at_the_end_point():
    toy = Toy(lambda s, t: t**2)  # X = x + (tau - sigma) x tau^2, dX/dtau = x tau^2 + 2 tau (tau - sigma) x
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.3, 0.8], dtype=torch.float64)
    tau = torch.tensor([0.4, 0.1, 0.3, 0.0], dtype=torch.float64)
    got = lagrangian_residual(toy, x, sigma, tau)
    lo, hi = (tau - H).clamp_min(0), torch.minimum(tau + H, sigma)
    c = ((lo + hi) / 2)[:, None]
    d_tau = x * c**2 + 2 * c * (c - sigma[:, None]) * x  # the central difference of a quadratic in tau is exact at c
    end = x + (c - sigma[:, None]) * x * c**2
    assert torch.allclose(got, d_tau - end * c**2, atol=1e-4)


def test_the_exact_map_of_a_known_flow_has_zero_loss():
    # data a point mass at 0: x_sigma = sigma z, velocity x / sigma, map X_{sigma,tau}(x) = (tau / sigma) x, u = x / sigma
    exact = Toy(lambda s, t: 1 / s)
    z = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 1.0], dtype=torch.float64)
    tau = sigma * torch.tensor([0.0, 0.2, 0.5, 0.9, 0.99, 0.6], dtype=torch.float64)
    x = sigma[:, None] * z
    assert lagrangian_residual(exact, x, sigma, tau).abs().max() < 1e-9
    assert torch.allclose(exact(x, sigma * T, class_labels=sigma * T).sample, z)  # the diagonal is the flow's velocity
    assert torch.allclose(flow_map_fn(exact, T, x, sigma, tau), (tau / sigma)[:, None] * x)


def test_a_trained_map_samples_the_data_in_one_and_two_jumps_and_reloads(trained):
    from stages.diffusion.data import load_generator_data
    from stages.diffusion.generator import load_generator
    from stages.diffusion.metrics.distances import sliced_wasserstein
    from stages.diffusion.pipeline import DistilGeneratorPipeline

    summary = json.loads((trained / "training.json").read_text())
    assert summary["diagonal_loss_last"] > 0 and summary["lagrangian_loss_last"] > 0
    test = load_generator_data("moons", DATA).split("test").flatten(1)
    sw = {k: sliced_wasserstein(sample_generator(trained, 500, k, 0).flatten(1), test) for k in (1, 4)}
    noise = sliced_wasserstein(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)), test)
    assert sw[1] < 0.75 * noise and sw[4] < 0.6 * noise  # measured: 0.21 and 0.16 against 0.35
    gen = load_generator(trained)
    assert (
        gen.kind == "flow-map"
        and json.loads((trained / "model_index.json").read_text())["_class_name"] == "DistilGeneratorPipeline"
    )
    one, two = sample_generator(trained, 64, 1, 0), sample_generator(trained, 64, 2, 0)
    assert one.shape == two.shape == (64, 2) and not torch.allclose(one, two)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    ones, zeros = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    assert torch.allclose(sample_generator(trained, 1, 1, 7), flow_map_fn(gen.model, T, torch.randn(
        1, 2, generator=torch.Generator().manual_seed(7)), ones[:1], zeros[:1]))  # fmt: skip
    pipe = DistilGeneratorPipeline.from_pretrained(trained)
    out = pipe(batch_size=8, num_inference_steps=1, generator=torch.Generator().manual_seed(3), return_dict=True).samples
    assert torch.allclose(out, flow_map_fn(gen.model, T, z, ones, zeros), atol=1e-6)


def test_an_image_flow_map_on_a_unet_saves_loads_and_samples(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stages.diffusion.generator import load_generator, save_generator
    from stages.diffusion.models import build_denoiser

    net = build_denoiser(DiffusionConfig(arch="unet", channels=[8, 16], norm_groups=4), [1, 8, 8], 0, two_times=True)
    save_generator(tmp_path / "g", net, FlowMatchEulerDiscreteScheduler(num_train_timesteps=T))
    gen = load_generator(tmp_path / "g")
    assert gen.kind == "flow-map" and gen.sample_shape == [1, 8, 8] and gen.classes == 0
    x = sample_generator(tmp_path / "g", 3, 2, 0)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_flow_map_resumes_like_an_uninterrupted_run(tmp_path):
    cfg = DistillConfig(method="flow-map", diffusion=DiffusionConfig(**NET), steps=12, batch_size=128, lr=0.003)
    resumes_like_uninterrupted(lambda out: distill.run(cfg, "moons", out, data_cfg=DATA, progress=False), tmp_path)


def test_a_flow_map_is_refused_as_a_teacher_and_as_a_trajectory_source(trained, tmp_path):
    cd = DistillConfig(method="consistency-distill", diffusion=DiffusionConfig(**NET), steps=4)
    with pytest.raises(DistilError, match="is a flow-map model"):
        distill.run(cd, "moons", tmp_path / "s", data_cfg=DATA, teachers=[trained], progress=False)
    with pytest.raises(DistilError, match="is a flow map"):
        generate_teacher_data.run(GenerateTeacherDataConfig(noise_samples=8, steps=2), trained, "moons", tmp_path / "td",
                                  data_cfg=DATA, progress=False)  # fmt: skip
    assert not (tmp_path / "s").exists() and not (tmp_path / "td").exists()
