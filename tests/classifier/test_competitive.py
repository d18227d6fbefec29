"""``competitive`` (CoMD): rounds in which the student up-weights its hardest rows and a copy of
a weak live teacher learns from the rows only the student gets right; the input teacher untouched."""

from __future__ import annotations

import json

import pytest
import torch

from stages.artifacts import load_tensors
from stages.classifier.models import load_classifier


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("competitive")
    cli = digits_cli(root)
    # a weak teacher (one epoch of a small MLP): there are rows the student gets right and it does not
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", root / "weak", "--set", "model.width=8", "--set",
           "epochs=1", "--set", "lr=0.003", "-q")  # fmt: skip
    return {"cli": cli, "weak": root / "weak"}


def test_rounds_exchange_hard_rows_and_the_teacher_learns_from_the_student(run, tmp_path):
    before = load_tensors(run["weak"] / "model.safetensors")
    run["cli"].ok("distill", "--method", "competitive", "--data", "digits", "--out", tmp_path / "m", "--teacher", run["weak"],
                  "--set", "epochs=12", "--set", "competitive_rounds=2", "-q")  # fmt: skip
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["student_hard_rows"] == round(0.2 * 300) for r in rounds)
    assert rounds[0]["teacher_hard_rows"] > 0  # the student beat the weak teacher somewhere, and the teacher was told
    assert rounds[-1]["teacher_dev_accuracy"] > summary["teacher_dev_accuracy_start"]
    teacher, _ = load_classifier(tmp_path / "m" / "teacher")
    after = teacher.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(load_tensors(run["weak"] / "model.safetensors")[k], v) for k, v in before.items())  # input kept
    student, config = load_classifier(tmp_path / "m")
    assert config["method"] == "competitive" and summary["dev_accuracy"] > rounds[0]["teacher_dev_accuracy"] - 0.2


def test_competitive_needs_a_live_teacher(cli, tiny_run, tmp_path):
    cli.fails("distill", "--method", "competitive", "--data", tiny_run["selected"], "--out", tmp_path / "a", "--set",
              "epochs=2", "-q", match="runs the teacher itself")  # fmt: skip
    assert not (tmp_path / "a").exists()
