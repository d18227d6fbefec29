"""Diffusion students through the CLI: a denoising teacher on moons, its trajectories
(resumable), consistency distillation, diffusers loading, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import ot
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Cli, dies_on_call, write_params
from diffusers import DiffusionPipeline, LCMScheduler

from stages.config import DataConfig
from stages.diffusion.data import load_generator_data, read_final_samples, read_trajectories
from stages.diffusion.pipeline import DistilGeneratorPipeline
from stages.diffusion.sampling import sample_generator

DATA = {"sizes": [1000, 100, 500], "limit": 0, "split_seed": 0}
PARAMS = {
    "data": DATA,
    "diffusion_teacher": {"method": "denoise", "diffusion": {"width": 64, "depth": 2, "checkpoint_every": 5},
                          "steps": 600, "batch_size": 128, "lr": 0.003},
    "diffusion_student": {"method": "consistency-distill", "steps": 300, "batch_size": 128, "lr": 0.003,
                          "diffusion": {"width": 64, "depth": 2, "skip": 50, "eval_samples": 256, "checkpoint_every": 5}},
    "generate_teacher_data": {"steps": 10, "noise_samples": 100, "shard_samples": 40, "save_every": 3, "batch_size": 32},
}  # fmt: skip


def _sw(x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.mean([ot.sliced_wasserstein_distance(x.numpy(), ref, n_projections=200, seed=s) for s in range(3)]))


def _nothing_at(out):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons")
    cli = Cli(write_params(root, **PARAMS))
    cli.ok("distill", "--section", "diffusion_teacher", "--data", "moons", "--out", root / "teacher", "-q")
    cli.ok(
        "distill", "--section", "diffusion_student", "-t", root / "teacher", "--data", "moons", "--out", root / "student", "-q"
    )
    return {"root": root, "cli": cli, "teacher": root / "teacher", "student": root / "student",
            "test": load_generator_data("moons", DataConfig(**DATA)).splits["test"]}  # fmt: skip


def test_denoise_trains_a_teacher_that_diffusers_loads(moons):
    teacher = moons["teacher"]
    manifest = json.loads((teacher / ".manifest.json").read_text())
    assert manifest["kind"] == "generator" and manifest["generator"]["kind"] == "diffusion"
    assert manifest["data"]["name"] == "moons" and manifest["params"]["distill"]["diffusion"]["prediction"] == "v_prediction"
    history = json.loads((teacher / "training.json").read_text())["history"]
    assert len(history) == 75 and history[-1]["loss"] < history[0]["loss"] and "dev_loss" in history[-1]
    assert not (teacher / "checkpoint").exists()
    pipe = DistilGeneratorPipeline.from_pretrained(teacher)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    many, one = sample_generator(teacher, 500, 50, 0), sample_generator(teacher, 500, 1, 0)
    assert _sw(many, moons["test"]) < _sw(one, moons["test"]) / 2  # 50 ODE steps beat the 1-step mean collapse


def test_consistency_student_beats_the_one_step_teacher_and_its_paired_error_falls(moons):
    student, ref = moons["student"], moons["test"]
    training = json.loads((student / "training.json").read_text())
    errors = [h["paired_error"] for h in training["history"]]
    assert training["paired_error_final"] == errors[-1] < training["paired_error_initial"] / 2
    quarter = len(errors) // 4
    assert np.mean(errors[-quarter:]) < np.mean(errors[:quarter])
    assert sum(b < a for a, b in zip(errors, errors[1:], strict=False)) > 0.7 * (len(errors) - 1)  # falls in most epochs
    assert training["paired_error_teacher_1step"] > 2 * errors[-1]
    one_step_teacher = _sw(sample_generator(moons["teacher"], 500, 1, 0), ref)
    for steps in (1, 2, 4):
        x = sample_generator(student, 500, steps, 0)
        assert x.shape == (500, 2) and torch.isfinite(x).all()
        assert _sw(x, ref) < one_step_teacher / 2, steps
    assert LCMScheduler.from_pretrained(student, subfolder="scheduler").config.original_inference_steps == 20
    assert type(DistilGeneratorPipeline.from_pretrained(student).scheduler).__name__ == "LCMScheduler"
    hybrid = sample_generator(student, 200, 4, 0, hybrid_first_step_teacher=moons["teacher"])
    assert torch.isfinite(hybrid).all() and not torch.allclose(hybrid, sample_generator(student, 200, 4, 0))


def test_teacher_trajectories_are_indexed_sharded_and_resume_after_a_kill(moons, tmp_path):
    import stages.diffusion.teacher_data as td

    cli, teacher = moons["cli"], moons["teacher"]
    ref, out = tmp_path / "ref", tmp_path / "traj"
    cli.ok("generate-teacher-data", "-t", teacher, "--data", "moons", "--out", ref, "-q")
    with dies_on_call(td, "save_tensors", 2, KeyboardInterrupt, after=False):
        result = cli("generate-teacher-data", "-t", teacher, "--data", "moons", "--out", out, "-q")
    assert result.exit_code == 130 and not out.exists()
    assert [p.name for p in sorted((tmp_path / "traj.partial").glob("part-*"))] == ["part-00000.parquet"]
    cli.ok("generate-teacher-data", "-t", teacher, "--data", "moons", "--out", out, "-q")
    table, states, manifest = read_trajectories(out)
    ref_table, ref_states, _ = read_trajectories(ref)
    assert table.equals(ref_table) and torch.equal(states, ref_states)
    assert manifest["kind"] == "diffusion_teacher_data" and manifest["shards"] == [
        f"_states/shard-{i:05d}.safetensors" for i in range(3)
    ]
    assert table.num_rows == 100 * 5  # noise, steps 3, 6, 9, and the final sample
    rows = table.filter(table.column("sample").to_numpy() == 41).to_pylist()
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 10] and rows[-1]["timestep"] == -1 and rows[0]["timestep"] == 999
    assert {r["shard"] for r in rows} == {1} and [r["seed"] for r in rows] == [41] * 5
    assert pq.read_table(out).num_rows == 500  # plain Parquet readers see the index
    final, _ = read_final_samples(out)
    assert torch.allclose(final, sample_generator(teacher, 100, 10, 0), atol=1e-5)
    noise = states[torch.from_numpy(np.flatnonzero(table.column("step").to_numpy() == 0))]
    assert torch.equal(noise[0], torch.randn(2, generator=torch.Generator().manual_seed(0)))
    # the trajectories' final samples are data too: a student learns from the teacher's samples alone
    cli.ok("distill", "--section", "diffusion_student", "-t", teacher, "--data", out, "--out", tmp_path / "s",
           "--set", "steps=4", "-q")  # fmt: skip
    assert json.loads((tmp_path / "s" / "training.json").read_text())["train_rows"] == 100


def test_denoise_resumes_from_its_checkpoint_like_an_uninterrupted_run(tmp_path):
    import stages.diffusion.training as training
    from stages import distill
    from stages.artifacts import load_tensors
    from stages.config import DiffusionConfig, DistillConfig

    cfg = DistillConfig(method="denoise", diffusion=DiffusionConfig(width=16, depth=1, checkpoint_every=1), steps=40,
                        batch_size=50, lr=0.003)  # fmt: skip
    data = DataConfig(sizes=[200, 20, 20])
    distill.run(cfg, "moons", tmp_path / "ref", data_cfg=data, progress=False)
    with dies_on_call(training, "save_state", 2, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        distill.run(cfg, "moons", tmp_path / "t", data_cfg=data, progress=False)
    assert (tmp_path / "t.partial" / "checkpoint" / "state.json").exists()
    distill.run(cfg, "moons", tmp_path / "t", data_cfg=data, progress=False)
    a = load_tensors(tmp_path / "t" / "denoiser" / "diffusion_pytorch_model.safetensors")
    b = load_tensors(tmp_path / "ref" / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in json.loads((tmp_path / "t" / "training.json").read_text())["history"]] == list(range(1, 11))


def test_a_tiny_unet_on_digits_images_and_its_student_load_in_diffusers(tmp_path):
    cli = Cli(write_params(tmp_path, data={"limit": 32}))
    unet = ["--set", "diffusion.channels=[8,16]", "--set", "diffusion.norm_groups=4", "--set", "batch_size=16"]
    cli.ok("distill", "--method", "denoise", "--data", "digits-images", "--out", tmp_path / "t", "--set", "steps=4", *unet, "-q")
    teacher = DiffusionPipeline.from_pretrained(tmp_path / "t")
    assert type(teacher).__name__ == "DDPMPipeline" and teacher.unet.config.sample_size == 8
    cli.ok("distill", "--method", "consistency-distill", "-t", tmp_path / "t", "--data", "digits-images", "--out", tmp_path / "s",
           "--set", "steps=2", "--set", "diffusion.eval_samples=8", "--set", "diffusion.eval_steps=4", *unet, "-q")  # fmt: skip
    student = DiffusionPipeline.from_pretrained(tmp_path / "s")
    assert isinstance(student.scheduler, LCMScheduler)
    x = sample_generator(tmp_path / "s", 3, 2, 0)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    cli.fails("distill", "--method", "consistency-distill", "-t", tmp_path / "t", "--data", "digits-images", "--out", tmp_path / "o",
              "--set", "data.image_size=16", match="shape")  # fmt: skip
    _nothing_at(tmp_path / "o")


def _broken_teacher(src, dst, scheduler_class=None, **config):
    shutil.copytree(src, dst)
    if scheduler_class:
        index = json.loads((dst / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler_class]
        (dst / "model_index.json").write_text(json.dumps(index))
        config["_class_name"] = scheduler_class
    path = dst / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def test_bad_input_gives_one_line_and_writes_nothing(moons, tmp_path):
    cli, teacher, student, out = moons["cli"], moons["teacher"], moons["student"], tmp_path / "o"
    cd = ["distill", "--method", "consistency-distill", "--out", out]
    gtd = ["generate-teacher-data", "--out", out]
    cli.fails("distill", "--method", "denoise", "--data", "moonz", "--out", out, match="must be generator data")
    cli.fails("distill", "--method", "kd", "--data", "moons", "--out", out, match="does not train generators")
    cli.fails("distill", "--method", "denoise", "-t", teacher, "--data", "moons", "--out", out, match="drop --teacher")
    cli.fails(*cd, "--data", "moons", match="needs exactly one diffusion teacher")
    cli.fails(*cd, "-t", teacher, "--data", "digits-images", match="shape [2]")
    cli.fails(*gtd, "-t", teacher, "--data", "digits-images", match="shape [2]")
    cli.fails(*cd, "-t", student, "--data", "moons", match="is a consistency model")
    cli.fails(*cd, "-t", teacher, "--data", "moons", "--set", "diffusion.solver=rk4", match="unknown diffusion.solver")
    cli.fails(*cd, "-t", teacher, "--data", "moons", "--set", "diffusion.skip=7", match="divide")
    cli.fails(*gtd, "-t", teacher, "--data", "moons", "--steps", "0", match="generate_teacher_data.steps must be >= 1, got 0")
    cli.fails(*gtd, "-t", teacher, "--data", "moons", "--set", "solver=rk4", match="unknown solver")
    cli.fails(*gtd, "-t", student, "--data", "moons", "--steps", "1", "--hybrid-first-step", teacher, match="steps >= 2")
    cli.fails(*gtd, "-t", teacher, "--data", "moons", "--hybrid-first-step", teacher, match="is a diffusion teacher")
    score = _broken_teacher(teacher, tmp_path / "score", "ScoreSdeVeScheduler")
    cli.fails(*cd, "-t", score, "--data", "moons", match="has no alphas_cumprod")
    flow = _broken_teacher(teacher, tmp_path / "flow", "FlowMatchEulerDiscreteScheduler")  # a flow map: a student, not a teacher
    cli.fails(*cd, "-t", flow, "--data", "moons", match="is a flow-map model")
    odd = _broken_teacher(teacher, tmp_path / "odd", prediction_type="flow")
    cli.fails(*cd, "-t", odd, "--data", "moons", match="prediction_type 'flow'")
    cli.fails(*gtd, "-t", odd, "--data", "moons", match="prediction_type 'flow'")
    _nothing_at(out)
