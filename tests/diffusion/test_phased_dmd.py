"""``phased-dmd``: the subinterval score-matching target against Tweedie's formula on a Gaussian,
the phase boundaries, the noise levels each phase is matched at, a 2-phase generator whose experts each learn their phase and that moves
toward the teacher's 2-step solution, a killed run resumed across a phase change, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOONS_DATA_SIZES, MOONS_NET, resumes_like_uninterrupted

from stages import distill
from stages.config import DataConfig, DiffusionConfig, DistillConfig
from stages.diffusion.methods.phased_dmd import matching_levels, phase_bounds, subinterval_target, transition
from stages.diffusion.sampling import sample_generator
from stages.diffusion.schedule import NoiseSchedule
from stages.errors import DistilError

DATA = DataConfig(sizes=MOONS_DATA_SIZES)
NET = MOONS_NET


def _phased(**extra) -> DistillConfig:
    d = DiffusionConfig(**NET, phases=2, eval_samples=64, eval_steps=10, dmd_pairs=64, target_ema=0.5)
    return DistillConfig(method="phased-dmd", diffusion=d, steps=24, batch_size=64, lr=0.0005, **extra)


def _cosine() -> NoiseSchedule:
    from diffusers import DDPMScheduler

    return NoiseSchedule.of(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), "test")


def test_the_subinterval_target_regresses_to_the_denoiser_of_the_noised_marginal():
    # x_s ~ N(0, c^2): x_t = r x_s + sigma_{t|s} z has variance v = r^2 c^2 + sigma_{t|s}^2, score -x_t / v, and
    # Tweedie's denoiser E[x_0 | x_t] = x_t (1 - sigma_t^2 / v) / alpha_t: the least-squares slope of y on x_t
    sch, c, n = _cosine(), 0.7, 400_000
    s, t = torch.full((n,), 300), torch.full((n,), 600)
    ratio, sig_ts = (v[0].item() for v in transition(sch, s, t))
    a_t, s_t = (v[0].item() for v in sch.alpha_sigma(t))
    g = torch.Generator().manual_seed(0)
    x_s = c * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_t = ratio * x_s + sig_ts * torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = subinterval_target(sch, x_s, x_t, s, t)
    slope = float((y * x_t).sum() / (x_t * x_t).sum())
    v = ratio**2 * c**2 + sig_ts**2
    assert slope == pytest.approx((1 - s_t**2 / v) / a_t, rel=0.02)
    x0 = torch.randn(8, 2, dtype=torch.float64)  # from clean data (s = -1) the target is the data itself
    t8 = torch.full((8,), 500)
    xt0 = sch.add_noise(x0, torch.randn(8, 2, dtype=torch.float64), t8)
    assert torch.allclose(subinterval_target(sch, x0, xt0, torch.full((8,), -1), t8), x0, atol=1e-9)


def test_phase_bounds_cut_the_schedule_evenly_and_refuse_a_count_that_does_not_divide_it():
    assert phase_bounds(1000, 2) == [-1, 499, 999]
    assert phase_bounds(1000, 4) == [-1, 249, 499, 749, 999]
    with pytest.raises(DistilError, match="divide the teacher's 1000 timesteps, got 3"):
        phase_bounds(1000, 3)


def test_each_phase_is_matched_at_every_level_above_its_end_and_the_last_one_over_dmds_whole_range():
    assert matching_levels(1000, 499, -1) == (20, 980)  # the clean sample: DMD's [0.02 T, 0.98 T], layout levels included
    assert matching_levels(1000, 999, 499) == (525, 980)  # x at 499: above it, a twentieth of the phase away
    assert matching_levels(1000, 499, 249) == (262, 980)  # an inner phase of four: up to the top, not only to 499


def test_two_phase_experts_each_learn_their_phase_and_move_toward_the_teacher(moons_teacher, tmp_path):
    from stages.diffusion.generator import load_generator

    distill.run(_phased(), "moons", tmp_path / "g", data_cfg=DATA, teachers=[moons_teacher], progress=False)
    summary = json.loads((tmp_path / "g" / "training.json").read_text())
    assert summary["boundaries"] == [-1, 499, 999] and summary["sampling_steps"] == 2
    assert summary["paired_error_final"] < summary["paired_error_initial"]
    assert summary["paired_error_final"] < summary["paired_error_teacher_2step"]
    assert [h["phase"] for h in summary["history"]] == [1, 1, 1, 2, 2, 2]  # 4 steps an epoch, phase 2 from step 12
    assert {"phase1_dm_loss_last", "phase2_dm_loss_last", "phase1_fake_loss_last", "phase2_reg_loss_last"} <= set(summary)
    model, base = load_generator(tmp_path / "g").model, load_generator(moons_teacher).model.state_dict()
    assert len(model.experts) == 2 and model.config.splits == [499]
    for e in model.experts:  # each trained during its own phase
        assert any(not torch.equal(v, base[k]) for k, v in e.state_dict().items())
    x = sample_generator(tmp_path / "g", 16, 2, 0)
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_phased_dmd_resumes_across_the_phase_change_like_an_uninterrupted_run(moons_teacher, tmp_path):
    resumes_like_uninterrupted(
        lambda out: distill.run(_phased(), "moons", out, data_cfg=DATA, teachers=[moons_teacher], progress=False), tmp_path)


def test_phased_dmd_refuses_one_phase_and_a_count_that_does_not_divide_the_schedule(moons_teacher, tmp_path):
    for phases, message in ((1, "phases >= 2"), (3, "divide the teacher's 1000 timesteps")):
        cfg = _phased()
        cfg.diffusion.phases = phases
        with pytest.raises(DistilError, match=message):
            distill.run(cfg, "moons", tmp_path / f"x{phases}", data_cfg=DATA, teachers=[moons_teacher], progress=False)
        assert not (tmp_path / f"x{phases}").exists()
