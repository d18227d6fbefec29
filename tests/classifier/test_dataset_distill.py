"""``dataset-distill`` (trajectory matching with smooth experts): the clipped expert loss, a
synthetic set whose matching loss falls and that trains a student better than the same number of
random real rows, written as a table other commands train on, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.classifier.methods.dataset import smooth_expert_loss
from stages.classifier.models import build_classifier
from stages.config import DataConfig
from stages.tasks import load_examples

SMALL = ["--set", "images_per_class=5", "--set", "dd_experts=2", "--set", "dd_expert_epochs=6", "--set", "dd_iterations=40",
         "--set", "dd_inner_steps=10", "--set", "dd_student_epochs=100", "-q"]  # fmt: skip


def test_the_clipped_loss_caps_hard_rows_and_keeps_their_direction():
    net = build_classifier("mlp", 8, 1, 0.0, [4], 3)
    params = dict(net.named_parameters())
    x, y = torch.randn(6, 4) * 5, torch.tensor([0, 1, 2, 0, 1, 2])
    raw = torch.nn.functional.cross_entropy(net(x), y, reduction="none").detach()
    clip = float(raw.detach().median())
    got = smooth_expert_loss(net, params, x, y, clip, 0.0)
    assert float(got.detach()) == pytest.approx(float(raw.clamp_max(clip).mean()), rel=1e-6)
    hard = int(raw.argmax())
    g_clip = torch.autograd.grad(smooth_expert_loss(net, params, x[hard : hard + 1], y[hard : hard + 1], clip, 0.0),
                                 params["head.weight"])[0]  # fmt: skip
    g_raw = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x[hard : hard + 1]), y[hard : hard + 1]),
                                params["head.weight"])[0]  # fmt: skip
    assert torch.allclose(g_clip, g_raw * clip / float(raw[hard]), atol=1e-6)
    assert float(smooth_expert_loss(net, params, x, y, 0.0, 1.0)) > float(smooth_expert_loss(net, params, x, y, 0.0, 0.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("dd")
    cli = digits_cli(root)
    cli.ok("distill", "--method", "dataset-distill", "--data", "digits", "--out", root / "dd", *SMALL)
    cli.ok("distill", "--method", "dataset-distill", "--data", "digits", "--out", root / "random", *SMALL,
           "--set", "dd_iterations=0")  # fmt: skip
    return {"cli": cli, "root": root}


def test_the_synthetic_set_is_a_table_of_five_rows_per_class_beside_the_real_dev_and_test(run, tmp_path):
    root = run["root"]
    ex = load_examples(root / "dd" / "synthetic", DataConfig())
    splits = np.asarray(ex.table.column("split").to_pylist())
    labels = np.asarray(ex.table.column("label").to_pylist())
    assert (splits == "train").sum() == 50 and np.bincount(labels[splits == "train"]).tolist() == [5] * 10
    real = load_examples("digits", DataConfig(split_seed=0, dev_frac=0.2, test_frac=0.2, limit=300))  # the CLI's tiny data
    assert (splits == "dev").sum() == len(real.split("dev")) and (splits == "test").sum() == len(real.split("test"))
    run["cli"].ok("distill", "--method", "ce", "--data", root / "dd" / "synthetic", "--out", tmp_path / "m", "--set", "epochs=3", "-q")
    assert json.loads((tmp_path / "m" / "training.json").read_text())["train_rows"] == 50
    # without matching, the set is real train rows
    rand = load_examples(root / "random" / "synthetic", DataConfig())
    rows = {tuple(r) for r in real.split("train").column("features").to_pylist()}
    train = rand.table.filter(np.asarray(rand.table.column("split").to_pylist()) == "train")
    assert all(tuple(r) in rows for r in train.column("features").to_pylist())


def test_matching_lowers_its_loss_and_trains_a_better_student_than_random_rows(run):
    dd = json.loads((run["root"] / "dd" / "training.json").read_text())
    rand = json.loads((run["root"] / "random" / "training.json").read_text())
    assert dd["match_loss_last"] < 0.7 * dd["match_loss_first"]
    assert rand["match_loss_first"] is None and dd["synthetic_rows"] == rand["synthetic_rows"] == 50
    assert dd["dev_accuracy"] > rand["dev_accuracy"]


def test_dataset_distill_refuses_more_rows_per_class_than_there_are_and_a_bad_match_span(run, tmp_path):
    cli = run["cli"]
    cli.fails("distill", "--method", "dataset-distill", "--data", "digits", "--out", tmp_path / "a", *SMALL,
              "--set", "images_per_class=500", match="fewer than images_per_class=500")  # fmt: skip
    cli.fails("distill", "--method", "dataset-distill", "--data", "digits", "--out", tmp_path / "b", *SMALL,
              "--set", "dd_match_epochs=6", match="must be below dd_expert_epochs")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
