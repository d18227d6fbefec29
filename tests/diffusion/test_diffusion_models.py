"""Denoising networks and generator folders: diffusers saves and loads them offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, LCMScheduler, UNet2DModel

from stages.config import DiffusionConfig
from stages.diffusion.generator import load_generator, save_generator
from stages.diffusion.methods.consistency import student_scheduler
from stages.diffusion.models import MLPDenoiser, build_denoiser
from stages.diffusion.pipeline import DistilGeneratorPipeline
from stages.diffusion.sampling import sample
from stages.errors import DistilError

TINY_UNET = DiffusionConfig(channels=[8, 16], norm_groups=4)


def _ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def test_mlp_denoiser_round_trips_through_save_pretrained(tmp_path):
    model = build_denoiser(DiffusionConfig(width=32, depth=2, time_dim=16), [2], seed=0)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    again = MLPDenoiser.from_pretrained(tmp_path / "m")
    x, t = torch.randn(5, 2), torch.tensor([0, 10, 500, 998, 999])
    assert torch.equal(model(x, t).sample, again(x, t).sample)
    assert again.config.sample_shape == (2,) or list(again.config.sample_shape) == [2]
    scalar = model(x, 3).sample  # a scalar timestep broadcasts over the batch
    assert torch.equal(scalar, model(x, torch.full((5,), 3)).sample)


def test_build_denoiser_picks_the_architecture_and_rejects_bad_shapes():
    assert isinstance(build_denoiser(DiffusionConfig(), [2], 0), MLPDenoiser)
    assert isinstance(build_denoiser(TINY_UNET, [1, 8, 8], 0), UNet2DModel)
    with pytest.raises(DistilError, match="square images"):
        build_denoiser(DiffusionConfig(arch="unet"), [2], 0)
    with pytest.raises(DistilError, match="norm_groups"):
        build_denoiser(DiffusionConfig(channels=[6, 16], norm_groups=4), [1, 8, 8], 0)
    with pytest.raises(DistilError, match="unknown diffusion.arch"):
        build_denoiser(DiffusionConfig(arch="dit"), [2], 0)


def test_unet_teacher_and_student_folders_load_as_diffusers_pipelines(tmp_path):
    unet = build_denoiser(TINY_UNET, [1, 8, 8], 0)
    save_generator(tmp_path / "teacher", unet, _ddpm())
    save_generator(tmp_path / "student", unet, student_scheduler(_ddpm(), 50, 10.0))
    teacher = DiffusionPipeline.from_pretrained(tmp_path / "teacher")
    assert type(teacher).__name__ == "DDPMPipeline" and isinstance(teacher.unet, UNet2DModel)
    assert UNet2DModel.from_pretrained(tmp_path / "teacher", subfolder="unet").config.sample_size == 8
    assert DDPMScheduler.from_pretrained(tmp_path / "teacher", subfolder="scheduler").config.prediction_type == "v_prediction"
    student = DiffusionPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(student.scheduler, LCMScheduler)
    student.set_progress_bar_config(disable=True)
    ours = sample(load_generator(tmp_path / "student"), [3], 1)
    theirs = student(batch_size=1, generator=torch.Generator().manual_seed(3), num_inference_steps=1, output_type="np").images
    assert np.allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), theirs, atol=1e-5)


def test_mlp_folders_load_with_the_distil_pipeline_and_by_component(tmp_path):
    model = build_denoiser(DiffusionConfig(width=32, depth=1), [2], 0)
    save_generator(tmp_path / "s", model, student_scheduler(_ddpm(), 50, 10.0))
    index = json.loads((tmp_path / "s" / "model_index.json").read_text())
    assert index["denoiser"] == ["stages.diffusion.models", "MLPDenoiser"] and index["scheduler"] == ["diffusers", "LCMScheduler"]
    pipe = DistilGeneratorPipeline.from_pretrained(tmp_path / "s")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(4)).samples
    assert torch.allclose(out, sample(load_generator(tmp_path / "s"), [4], 1), atol=1e-5)
    assert isinstance(MLPDenoiser.from_pretrained(tmp_path / "s", subfolder="denoiser"), MLPDenoiser)
    assert LCMScheduler.from_pretrained(tmp_path / "s", subfolder="scheduler").config.original_inference_steps == 50


def test_load_generator_imports_only_known_classes(tmp_path):
    save_generator(tmp_path / "g", build_denoiser(DiffusionConfig(width=8, depth=1), [2], 0), _ddpm())
    index = json.loads((tmp_path / "g" / "model_index.json").read_text())
    index["denoiser"] = ["os", "system"]
    (tmp_path / "g" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DistilError, match="not one distil loads"):
        load_generator(tmp_path / "g")
    with pytest.raises(DistilError, match="not a generator folder"):
        load_generator(tmp_path)
