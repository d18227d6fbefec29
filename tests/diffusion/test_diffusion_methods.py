"""The few-step students of METHODS.md section 7 beyond consistency distillation, through
the CLI on moons: multistep consistency, consistency training (iCT), image-free trajectory
distillation (TBCM) and progressive distillation. Each is sampled in s steps by
``sampling.sample_generator`` and lands closer to the data (sliced Wasserstein) than the
teacher with the same steps (iCT, which has no teacher: than an untrained network);
each folder loads in diffusers and samples there as here; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import Cli, dies_on_call, write_params
from diffusers import CMStochasticIterativeScheduler, DDIMScheduler, DiffusionPipeline, LCMScheduler

from stages.config import DataConfig, DiffusionConfig
from stages.diffusion.data import load_generator_data
from stages.diffusion.generator import load_generator, save_generator
from stages.diffusion.methods.consistency_train import curriculum, lognormal_index
from stages.diffusion.methods.multistep import segment_grid
from stages.diffusion.methods.progressive import rounds
from stages.diffusion.metrics.distances import sliced_wasserstein
from stages.diffusion.models import build_denoiser
from stages.diffusion.pipeline import DistilGeneratorPipeline
from stages.diffusion.sampling import consistency_fn, consistency_timesteps, sample_generator
from stages.diffusion.schedule import KarrasSchedule, karras_sigmas
from stages.errors import DistilError

DATA = {"sizes": [1000, 100, 500], "limit": 0, "split_seed": 0}
NET = {"width": 64, "depth": 2, "checkpoint_every": 50, "eval_samples": 256}
STUDENT = {"batch_size": 128, "lr": 0.003}
PARAMS = {
    "data": DATA,
    "diffusion_teacher": {"method": "denoise", "steps": 600, **STUDENT, "diffusion": NET},
    "multistep": {"method": "multistep", "steps": 300, **STUDENT, "diffusion": {**NET, "segments": 4}},
    "progressive": {"method": "progressive", "steps": 200, **STUDENT,
                    "diffusion": {**NET, "teacher_steps": 16, "target_steps": 4}},
    "trajectory": {"method": "trajectory", "steps": 300, **STUDENT, "diffusion": NET},
    "consistency_train": {"method": "consistency-train", "steps": 800, **STUDENT, "diffusion": NET},
    "generate_teacher_data": {"steps": 20, "save_every": 1, "noise_samples": 500, "shard_samples": 500, "batch_size": 500},
}  # fmt: skip
N = 500


def _sw(path, steps: int, ref) -> float:
    return sliced_wasserstein(sample_generator(path, N, steps, 0), ref)


def _nothing_at(out):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def _same_in_diffusers(path, steps: int) -> bool:
    """Our sampler and the folder's diffusers pipeline agree on sample 7 (its own seeded generator)."""
    pipe = DistilGeneratorPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(7)).samples
    return torch.allclose(sample_generator(path, 1, steps, 7), theirs, atol=1e-4)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    cli = Cli(write_params(root, **PARAMS))
    p = {name: root / name for name in ("teacher", "traj", "multistep", "progressive", "trajectory", "ict")}
    cli.ok("distill", "--section", "diffusion_teacher", "--data", "moons", "--out", p["teacher"], "-q")
    cli.ok("generate-teacher-data", "-t", p["teacher"], "--data", "moons", "--out", p["traj"], "-q")
    for section in ("multistep", "progressive"):
        cli.ok("distill", "--section", section, "-t", p["teacher"], "--data", "moons", "--out", p[section], "-q")
    cli.ok("distill", "--section", "trajectory", "-t", p["teacher"], "--data", p["traj"], "--out", p["trajectory"], "-q")
    cli.ok("distill", "--section", "consistency_train", "--data", "moons", "--out", p["ict"], "-q")
    test = load_generator_data("moons", DataConfig(**DATA)).splits["test"]
    teacher_sw = {k: _sw(p["teacher"], k, test) for k in (1, 2, 4)}
    return {"root": root, "cli": cli, "test": test, "teacher_sw": teacher_sw, **p}


def _training(path) -> dict:
    return json.loads((path / "training.json").read_text())


def test_multistep_segments_nest_on_the_trailing_grid():
    bounds, triples = segment_grid(1000, 4, 20)
    assert bounds == [-1, 249, 499, 749, 999]
    t, s, e = triples.unbind(1)
    assert (e < s).logical_or(s == e).all() and (s < t).all() and (t - s <= 20).all()
    seg = torch.bucketize(t.contiguous(), torch.tensor(bounds[1:]), right=False)  # the segment (e_j, e_{j+1}] holding t
    assert torch.equal(torch.tensor(bounds)[seg], e) and set(bounds[1:]) <= set(t.tolist())
    one, grid = segment_grid(1000, 1, 20)[1], torch.arange(1, 51) * 20 - 1
    assert one[:, 0].tolist() == grid.tolist() and one[:, 1].tolist() == (grid - 20).tolist()  # segments 1 = CD's grid
    with pytest.raises(DistilError, match="segments"):
        segment_grid(1000, 0, 20)


def test_multistep_student_beats_the_teacher_at_its_steps_and_loads_in_diffusers(moons):
    path, training = moons["multistep"], _training(moons["multistep"])
    assert training["sampling_steps"] == 4 and training["boundaries"] == [-1, 249, 499, 749, 999]
    assert training["paired_error_final"] < training["paired_error_teacher_4step"] / 2
    assert _sw(path, 4, moons["test"]) < moons["teacher_sw"][4] * 0.75
    assert isinstance(DDIMScheduler.from_pretrained(path, subfolder="scheduler"), DDIMScheduler)
    assert json.loads((path / ".manifest.json").read_text())["generator"]["scheduler"] == "DDIMScheduler"
    assert _same_in_diffusers(path, 4)


def test_progressive_halves_the_steps_and_beats_the_teacher_at_the_target(moons):
    assert rounds(64, 4, 1000) == [32, 16, 8, 4] and rounds(16, 1, 1000) == [8, 4, 2, 1]
    path, training = moons["progressive"], _training(moons["progressive"])
    assert [r["student_steps"] for r in training["history"]] == [8, 4] and training["sampling_steps"] == 4
    for r in training["history"]:  # every round's student at n steps beats the original teacher at n steps
        assert r["paired_error"] < r["original_teacher_paired_error"] / 2, r["round"]
    assert _sw(path, 4, moons["test"]) < moons["teacher_sw"][4] * 0.75
    assert _same_in_diffusers(path, 4)


def test_trajectory_student_beats_the_teacher_at_one_and_two_steps(moons):
    path, training = moons["trajectory"], _training(moons["trajectory"])
    assert training["grid_points"] == 20 and training["trajectory_count"] == 500 and training["train_rows"] == 500
    assert training["timesteps"][0] == 999 and training["timesteps"][-2:] == [49, -1]
    assert training["paired_error_final"] < training["paired_error_teacher_1step"] / 4
    for steps in (1, 2):
        assert _sw(path, steps, moons["test"]) < moons["teacher_sw"][steps] / 2, steps
    assert LCMScheduler.from_pretrained(path, subfolder="scheduler").config.original_inference_steps == 20
    assert _same_in_diffusers(path, 1) and _same_in_diffusers(path, 4)


def test_trajectory_never_reads_the_dataset(moons, monkeypatch, tmp_path):
    import stages.diffusion.data as generators

    def no_images(*args, **kwargs):
        raise AssertionError("the trajectory method read the training data")

    monkeypatch.setattr(generators, "_toy", no_images)
    monkeypatch.setattr(generators, "digits_images", no_images)
    cli, teacher = moons["cli"], moons["teacher"]
    cli.ok("distill", "--section", "trajectory", "-t", teacher, "--data", moons["traj"], "--out", tmp_path / "s",
           "--set", "steps=8", "-q")  # fmt: skip
    assert _training(tmp_path / "s")["epochs"] == 2
    for raw in ("moons", "digits-images"):
        cli.fails("distill", "--section", "trajectory", "-t", teacher, "--data", raw, "--out", tmp_path / "o", match="image-free")
    _nothing_at(tmp_path / "o")


def test_karras_levels_curriculum_and_lognormal_index():
    sig = karras_sigmas(11, 0.002, 80.0, 7.0)
    assert abs(sig[0] - 0.002) < 1e-12 and abs(sig[-1] - 80) < 1e-9 and (sig[1:] > sig[:-1]).all()
    levels = curriculum(10, 1280, 800)  # 8 stages of 100 steps: 11, 21, ..., 1281
    assert [levels(k) for k in range(0, 800, 100)] == [11, 21, 41, 81, 161, 321, 641, 1281] and levels(10**6) == 1281
    p = lognormal_index(karras_sigmas(1281, 0.002, 80.0, 7.0), -1.1, 2.0)
    assert abs(float(p.sum()) - 1) < 1e-12 and (p >= 0).all()
    mode = float(karras_sigmas(1281, 0.002, 80.0, 7.0)[int(p.argmax())])
    assert 0.05 < mode < 1.0  # the lognormal puts most weight near exp(P_mean - P_std^2) .. exp(P_mean)


def test_consistency_training_learns_from_data_alone(moons, tmp_path):
    path, training = moons["ict"], _training(moons["ict"])
    assert abs(training["scale"] - 2) < 0.01 and abs(training["sigma_max"] - 160) < 1  # toys have std 1: iCT x 2
    levels = [h["noise_levels"] for h in training["history"]]
    assert levels[0] == 11 and levels[-1] == 1281 and levels == sorted(levels)
    scheduler = CMStochasticIterativeScheduler.from_pretrained(path, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1281 and not scheduler.config.clip_denoised
    gen = load_generator(path)
    assert gen.kind == "consistency" and consistency_timesteps(gen, 2) == [1280, 640]
    scheduler.set_timesteps(4)
    assert torch.allclose(gen.schedule.sigma(torch.tensor(consistency_timesteps(gen, 4))).float(), scheduler.sigmas[:-1])
    x = torch.randn(8, 2)  # the boundary condition f(x, sigma_min) = x
    assert torch.allclose(consistency_fn(gen.denoise, gen.schedule, x, torch.zeros(8, dtype=torch.long)), x, atol=1e-5)
    save_generator(tmp_path / "untrained", build_denoiser(DiffusionConfig(width=64, depth=2), [2], 0), scheduler)
    for steps in (1, 2, 4):
        ict = _sw(path, steps, moons["test"])
        assert ict < _sw(tmp_path / "untrained", steps, moons["test"]) / 2, steps
        assert ict < moons["teacher_sw"][1] / 2, steps  # far ahead of the teacher's one-step mean collapse
    assert _same_in_diffusers(path, 1) and _same_in_diffusers(path, 2)


def test_a_tiny_unet_trains_with_each_method_and_loads_as_its_diffusers_pipeline(tmp_path):
    cli = Cli(write_params(tmp_path, data={"limit": 16}))
    unet = ["--set", "diffusion.channels=[8,16]", "--set", "diffusion.norm_groups=4", "--set", "batch_size=8",
            "--set", "steps=2", "--set", "diffusion.eval_samples=4", "--set", "diffusion.eval_steps=2"]  # fmt: skip
    run = ["--data", "digits-images", *unet, "-q"]
    cli.ok("distill", "--method", "denoise", "--out", tmp_path / "t", *run)
    cli.ok("distill", "--method", "consistency-train", "--out", tmp_path / "ict", *run)
    cli.ok("distill", "--method", "progressive", "-t", tmp_path / "t", "--out", tmp_path / "pd", *run,
           "--set", "diffusion.teacher_steps=4", "--set", "diffusion.target_steps=2")  # fmt: skip
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "ict")).__name__ == "ConsistencyModelPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "pd")).__name__ == "DDIMPipeline"
    for name in ("ict", "pd"):
        x = sample_generator(tmp_path / name, 2, 2, 0)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("method", ["progressive", "consistency-train", "consistency-distill"])
def test_a_killed_run_resumes_like_an_uninterrupted_one(tmp_path, method):
    """Progressive resumes inside its second round; iCT's curriculum resumes at the step it
    reached (it counts the optimiser steps the checkpoint restores); consistency distillation
    with a sampling EMA restores both averages, the target and the saved one."""
    import stages.diffusion.training as training
    from stages import distill
    from stages.artifacts import load_tensors
    from stages.config import DistillConfig

    diffusion = DiffusionConfig(width=16, depth=1, checkpoint_every=1, eval_samples=8, eval_steps=4, teacher_steps=4,
                                target_steps=1, curriculum=[2, 8], sample_ema=0.9)  # fmt: skip
    cfg = DistillConfig(method=method, diffusion=diffusion, steps=12, batch_size=50, lr=0.003)
    data, teachers, kill = DataConfig(sizes=[200, 20, 20]), [], 2  # 3 epochs (checkpoints) a round
    if method != "consistency-train":  # a tiny teacher; progressive: two rounds, 4 -> 2 -> 1 steps; killed in the second
        teachers, kill = [tmp_path / "t"], 5 if method == "progressive" else 2
        cli = Cli(write_params(tmp_path, data={"sizes": [200, 20, 20]}))
        cli.ok("distill", "--method", "denoise", "--data", "moons", "--out", tmp_path / "t", "--set", "steps=8",
               "--set", "diffusion.width=16", "--set", "diffusion.depth=1", "-q")  # fmt: skip
    distill.run(cfg, "moons", tmp_path / "ref", data_cfg=data, teachers=teachers, progress=False)
    with dies_on_call(training, "save_state", kill, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        distill.run(cfg, "moons", tmp_path / "s", data_cfg=data, teachers=teachers, progress=False)
    distill.run(cfg, "moons", tmp_path / "s", data_cfg=data, teachers=teachers, progress=False)
    a = load_tensors(tmp_path / "s" / "denoiser" / "diffusion_pytorch_model.safetensors")
    b = load_tensors(tmp_path / "ref" / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def history(path):
        return [{k: v for k, v in row.items() if k != "train_seconds"} for row in _training(path)["history"]]

    assert history(tmp_path / "s") == history(tmp_path / "ref")
    if method == "consistency-distill":  # the saved average is not the target network
        assert _training(tmp_path / "s")["sample_ema"] == 0.9
        target = replace(cfg, diffusion=replace(diffusion, sample_ema=0.0))
        distill.run(target, "moons", tmp_path / "target", data_cfg=data, teachers=teachers, progress=False)
        c = load_tensors(tmp_path / "target" / "denoiser" / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_input_gives_one_line_and_writes_nothing(moons, tmp_path):
    cli, teacher, ict, out = moons["cli"], moons["teacher"], moons["ict"], tmp_path / "o"
    d = ["distill", "--out", out, "--data", "moons"]
    gtd = ["generate-teacher-data", "--data", "moons", "--set", "noise_samples=8"]
    cli.fails(*d, "--section", "multistep", "-t", teacher, "--set", "diffusion.segments=0", match="segments must be")
    cli.fails(*d, "--section", "multistep", "-t", teacher, "--set", "diffusion.segments=1001", match="segments must be")
    cli.fails(*d, "--section", "multistep", "-t", ict, match="is a consistency model")
    cli.fails(*d, "--section", "multistep", match="needs exactly one diffusion teacher")
    cli.fails(*d, "--section", "progressive", "-t", teacher, "--set", "diffusion.target_steps=3", match="power of two")
    cli.fails(*d, "--section", "progressive", "-t", teacher, "--set", "diffusion.teacher_steps=24", match="power of two")
    cli.fails(*d, "--section", "progressive", "-t", teacher, "--set", "diffusion.target_steps=0", match="target_steps")
    cli.fails(*d, "--section", "progressive", "-t", teacher, "--set", "diffusion.teacher_steps=2048", match="teacher_steps")
    cli.fails(*d, "--section", "progressive", "-t", ict, match="is a consistency model")
    cli.fails(*d, "--section", "multistep", "-t", teacher, "--set", "diffusion.sample_ema=1", match="sample_ema must be")
    cli.fails(*d, "--section", "consistency_train", "-t", teacher, match="drop --teacher")
    cli.fails(*d, "--section", "consistency_train", "--set", "diffusion.curriculum=[10]", match="curriculum")
    cli.fails(*d, "--section", "consistency_train", "--set", "diffusion.sigma_min=100", match="sigma_min < sigma_max")
    # trajectories that cannot teach: too few saved timesteps, an uneven grid, another model, a consistency sampler
    few, uneven, other, cm = (tmp_path / n for n in ("few", "uneven", "other", "cm"))
    cli.ok(*gtd, "-t", teacher, "--out", few, "--set", "save_every=0", "-q")
    cli.ok(*gtd, "-t", teacher, "--out", uneven, "--set", "save_every=3", "-q")
    cli.ok(*gtd, "-t", moons["multistep"], "--out", other, "-q")
    cli.ok(*gtd, "-t", ict, "--out", cm, "--steps", "2", "-q")
    traj = ["distill", "--out", out, "--section", "trajectory", "-t", teacher, "--data"]
    cli.fails(*traj, few, match="even grid of at least 2 timesteps")
    cli.fails(*traj, uneven, match="even grid of at least 2 timesteps")
    cli.fails(*traj, other, match="another model")
    cli.fails(*traj, cm, match="consistency sampler")
    cli.fails("distill", "--out", out, "--section", "trajectory", "--data", moons["traj"], match="needs exactly one")
    with pytest.raises(DistilError, match="variance-exploding"):
        sample_generator(ict, 4, 2, 0, hybrid_first_step_teacher=teacher)
    _nothing_at(out)


def test_karras_schedule_matches_diffusers_consistency_scheduler():
    """Levels, boundary scalings and noise embedding as diffusers' CMStochasticIterativeScheduler
    has them: f(x, sigma_min) = x, and at sigma_max f is (almost) all network (Song et al.
    2023, appendix C)."""
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=41, sigma_min=0.002, sigma_max=80.0, clip_denoised=False)
    sch = KarrasSchedule.of(scheduler, "test")
    c_skip, c_out, c_in, c_noise = sch.scalings(sch.sigmas)
    ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition(sch.sigmas)
    assert torch.allclose(c_skip, ref_skip.double()) and torch.allclose(c_out, ref_out.double())
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[-1] < 1e-4 and abs(float(c_out[-1]) - 0.5) < 1e-3
    assert torch.allclose(c_noise, torch.from_numpy(scheduler.sigma_to_t(sch.sigmas.numpy())))
    assert math.isclose(float(c_in[-1]), 1 / math.sqrt(80**2 + 0.25))
    assert np.allclose(sch.sigmas.float().numpy(), scheduler.sigmas.numpy()[::-1], rtol=1e-5)
