"""``control-lora`` (control transfer): a LoRA fitted to an unconditional digits teacher on one
class's images, saved in PEFT's format and merged; ``evaluate --set control=DIR`` merges the same
adapter unchanged into the teacher and its distilled student and reports the share of samples of
that class with and without it; refusals of a conditional teacher, unlabelled data, a class that
is not there and a model of another architecture."""

from __future__ import annotations

import json

import pytest
import torch

from stages import distill
from stages.artifacts import load_tensors
from stages.config import DataConfig, DiffusionConfig, DistillConfig, EvaluateConfig
from stages.diffusion.control import apply_control
from stages.diffusion.evaluate import evaluate_generators
from stages.diffusion.metrics.digits_features import train_digits_classifier
from stages.errors import DistilError
from stages.tasks.digits_images import digits_images

DIGITS = "digits-images"
DATA = DataConfig()
MLP = {"arch": "mlp", "width": 128, "depth": 2, "checkpoint_every": 100}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    teacher = DistillConfig(method="denoise", diffusion=DiffusionConfig(**MLP, prediction="v_prediction"), steps=300,
                            batch_size=128, lr=0.003)  # fmt: skip
    distill.run(teacher, DIGITS, root / "teacher", data_cfg=DATA, progress=False)
    lora = DistillConfig(method="control-lora", diffusion=DiffusionConfig(**MLP, control_class=3, control_rank=4), steps=100,
                         batch_size=64, lr=0.003)  # fmt: skip
    distill.run(lora, DIGITS, root / "ctrl", data_cfg=DATA, teachers=[root / "teacher"], progress=False)
    student = DistillConfig(method="consistency-distill", diffusion=DiffusionConfig(**MLP, skip=50, solver="heun"), steps=100,
                            batch_size=128, lr=0.0005)  # fmt: skip
    distill.run(student, DIGITS, root / "student", data_cfg=DATA, teachers=[root / "teacher"], progress=False)
    return root


def test_the_adapter_is_peft_format_on_frozen_weights_and_merges_to_the_saved_model(chain, tmp_path):
    from peft import PeftConfig

    ctrl = chain / "ctrl"
    config = PeftConfig.from_pretrained(ctrl / "control")
    assert config.r == 4 and set(config.target_modules) >= {"inp", "out.1"}
    summary = json.loads((ctrl / "training.json").read_text())
    assert summary["control_class"] == 3 and 0 < summary["adapter_params"] < summary["params"] / 5
    assert summary["class_rows"] == int((digits_images(DATA)[1][digits_images(DATA)[2] == "train"] == 3).sum())
    again = apply_control(chain / "teacher", ctrl, tmp_path / "again")  # the same adapter on the teacher, applied afresh
    a, b = load_tensors(again / "denoiser" / WEIGHTS), load_tensors(ctrl / "denoiser" / WEIGHTS)
    base = load_tensors(chain / "teacher" / "denoiser" / WEIGHTS)
    assert a.keys() == b.keys() == base.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], base[k]) for k in a)


def test_evaluate_applies_the_adapter_unchanged_to_teacher_and_student(chain, tmp_path):
    x, y, split = digits_images(DATA)
    clf = train_digits_classifier(x[split == "train"], y[split == "train"], seed=0)
    cfg = EvaluateConfig(n_samples=200, time_samples=0, control=str(chain / "ctrl"))
    out = evaluate_generators(
        [chain / "teacher", chain / "student"], DIGITS, [2, 20], cfg, tmp_path / "ev", data_cfg=DATA, classifier=clf
    )
    m = json.loads((out / "metrics.json").read_text())
    share = {k: v["control_share"] for k, v in m.items() if k != "floor"}
    assert share["teacher+control/steps_20"] > share["teacher/steps_20"] + 0.3  # measured 0.76 against 0.12
    assert share["student+control/steps_2"] > share["student/steps_2"] + 0.3  # 0.99 against 0.10: the control survives
    assert (out / "controlled" / "student+control" / "model_index.json").is_file()


def test_control_lora_refuses_what_it_cannot_control(chain, tmp_path):
    lora = DistillConfig(method="control-lora", diffusion=DiffusionConfig(**MLP, control_class=12), steps=2)
    with pytest.raises(DistilError, match="control_class 12 is not a class"):
        distill.run(lora, DIGITS, tmp_path / "a", data_cfg=DATA, teachers=[chain / "teacher"], progress=False)
    assert not (tmp_path / "a").exists()
    other = DistillConfig(method="denoise", diffusion=DiffusionConfig(arch="mlp", width=16, depth=1), steps=2, batch_size=64)
    distill.run(other, DIGITS, tmp_path / "small", data_cfg=DATA, progress=False)
    with pytest.raises(DistilError, match="another shape"):
        apply_control(tmp_path / "small", chain / "ctrl", tmp_path / "b")
    with pytest.raises(DistilError, match="not a control-lora folder"):
        apply_control(tmp_path / "small", tmp_path / "small", tmp_path / "c")
