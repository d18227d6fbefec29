"""Feature standardisation of user tables: fitted on the train split only, saved in the
model directory and applied wherever the model is loaded, optional, and worth it on wine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from stages.classifier.models import WEIGHTS, Standardize, augment_scaled, load_classifier
from stages.tasks.splits import stratified_split

ALL_ROWS = ["--set", "data.limit=0", "--set", "data.split_column=split"]


def _wine(path: Path, *, shift_held_out: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's wine (plus a constant column) as a CSV with a fixed split column;
    ``shift_held_out`` scales and shifts every dev/test feature value. Returns (x, y, split)."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    x = np.hstack([wine.data, np.full((len(wine.data), 1), 5.0)])
    y, split = wine.target, stratified_split(wine.target, 0.2, 0.2, 0)
    held_out = split != "train"
    x[held_out] = x[held_out] * (1 + shift_held_out) + shift_held_out
    names = [f"f{i}" for i in range(x.shape[1])]
    lines = [",".join([*names, "target", "split"])]
    lines += [",".join([*map(repr, row), str(t), s]) for row, t, s in zip(x.tolist(), y, split, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return x, y, split


def _scaler(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(model_dir / WEIGHTS).items() if k.startswith("scaler.")}


def _train(cli, data: Path, out: Path, *args: str) -> None:
    cli.ok("distill", "--method", "ce", "--data", data, "--label", "target", "--out", out, *ALL_ROWS, "-q", *args)


def test_scaler_is_fitted_on_train_rows_only_and_constant_features_stay_finite(cli, tmp_path):
    x, _, split = _wine(tmp_path / "a.csv")
    _wine(tmp_path / "b.csv", shift_held_out=1000.0)  # same train rows, wildly different dev/test rows
    _train(cli, tmp_path / "a.csv", tmp_path / "a", "--set", "epochs=1")
    _train(cli, tmp_path / "b.csv", tmp_path / "b", "--set", "epochs=1")
    a, b = _scaler(tmp_path / "a"), _scaler(tmp_path / "b")
    assert set(a) == {"scaler.mean", "scaler.std"} and json.loads((tmp_path / "a" / "config.json").read_text())["standardize"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    train = x[split == "train"]
    np.testing.assert_allclose(a["scaler.mean"].numpy(), train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(a["scaler.std"].numpy()[:-1], train.std(0)[:-1], rtol=1e-5)
    assert a["scaler.std"][-1] == 1.0  # the constant column: std 1, not a division by zero
    model, _ = load_classifier(tmp_path / "a")
    assert torch.isfinite(model(torch.from_numpy(x).float())).all()


def test_a_scaled_model_evaluates_after_reload_as_it_scored_in_training(cli, tmp_path):
    x, y, split = _wine(tmp_path / "w.csv")
    _train(cli, tmp_path / "w.csv", tmp_path / "m", "--set", "epochs=3", "--set", "checkpoint=last")
    cli.ok("evaluate", "--model", tmp_path / "m", "--data", tmp_path / "w.csv", "--label", "target", "--out", tmp_path / "ev",
           *ALL_ROWS, "--set", "split=dev", "-q")  # fmt: skip
    trained = json.loads((tmp_path / "m" / "training.json").read_text())
    reloaded = json.loads((tmp_path / "ev" / "metrics.json").read_text())["m"]
    assert reloaded["accuracy"] == trained["dev_accuracy"]
    assert abs(reloaded["nll"] - trained["dev_nll"]) < 1e-5
    # the loaded network on raw rows == its layers after the train split's z-score, by hand
    model, _ = load_classifier(tmp_path / "m")
    train = x[split == "train"]
    z = (x - train.mean(0)) / np.where(train.std(0) > 0, train.std(0), 1.0)
    with torch.no_grad():
        by_hand = model.head(model.trunk(torch.from_numpy(z).float()))
        assert torch.allclose(model(torch.from_numpy(x).float()), by_hand, atol=1e-4)


def test_wine_teacher_is_clearly_better_with_scaling_and_off_means_raw_features(cli, tmp_path):
    _wine(tmp_path / "w.csv")
    fast = ["--set", "epochs=10", "--set", "lr=0.01", "--set", "model.width=32"]
    acc = {}
    for on in ("true", "false"):
        _train(cli, tmp_path / "w.csv", tmp_path / on, *fast, "--set", f"data.standardize={on}")
        cli.ok("evaluate", "--model", tmp_path / on, "--data", tmp_path / "w.csv", "--label", "target",
               "--out", tmp_path / f"ev_{on}", *ALL_ROWS, "-q")  # fmt: skip
        acc[on] = json.loads((tmp_path / f"ev_{on}" / "metrics.json").read_text())[on]["accuracy"]
    off, _ = load_classifier(tmp_path / "false")
    assert off.scaler is None and not _scaler(tmp_path / "false")
    assert json.loads((tmp_path / "false" / "config.json").read_text())["standardize"] is False
    assert acc["true"] >= 0.9 and acc["true"] > acc["false"] + 0.15, acc  # measured: 1.00 against 0.67


def test_a_student_applies_its_own_scaler_fitted_on_the_same_train_split(cli, tmp_path):
    x, _, split = _wine(tmp_path / "w.csv")
    _train(cli, tmp_path / "w.csv", tmp_path / "t", "--set", "epochs=1")
    cli.ok("generate-teacher-data", "--teacher", tmp_path / "t", "--data", tmp_path / "w.csv", "--label", "target",
           "--out", tmp_path / "td", *ALL_ROWS, "-q")  # fmt: skip
    stored = np.stack(pq.read_table(tmp_path / "td").sort_by("id").column("features").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(stored, x.astype(np.float32))  # teacher data keeps raw features
    student = ["distill", "--method", "kd", "--data", tmp_path / "td", "--set", "epochs=1", "--set", "data.limit=0", "-q"]
    cli.ok(*student, "--out", tmp_path / "s")
    teacher_scaler, student_scaler = _scaler(tmp_path / "t"), _scaler(tmp_path / "s")
    assert set(student_scaler) == set(teacher_scaler) == {"scaler.mean", "scaler.std"}
    for k in teacher_scaler:
        assert torch.allclose(teacher_scaler[k], student_scaler[k]), k
    cli.ok(*student, "--out", tmp_path / "raw", "--set", "data.standardize=false")
    assert not _scaler(tmp_path / "raw")  # its own choice, whatever its teacher did


def test_digits_images_keep_raw_pixels(tiny_run):
    model, config = load_classifier(tiny_run["teacher"])
    assert model.scaler is None and config["standardize"] is False


def test_standardize_maps_train_rows_to_zero_mean_unit_std_and_a_constant_to_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 3, generator=g) * torch.tensor([1.0, 100.0, 0.01]) + 7, torch.full((50, 1), 3.0)], 1)
    z = Standardize(4).fit(x)(x)
    assert torch.isfinite(z).all() and torch.equal(z[:, 3], torch.zeros(50))
    torch.testing.assert_close(z[:, :3].mean(0), torch.zeros(3), atol=1e-4, rtol=0)  # float32 rounding of 7 +- 0.01
    torch.testing.assert_close(z[:, :3].std(0, correction=0), torch.ones(3), atol=1e-4, rtol=0)


def test_strong_augmentation_drops_a_scaled_feature_to_its_train_mean_not_to_raw_zero():
    x = torch.randn(400, 5) * 10 + 50
    scaler = Standardize(5).fit(x)
    out = augment_scaled(x, [5], "strong", torch.Generator().manual_seed(0), scaler)
    dropped = torch.isclose(out, scaler.mean.expand_as(out), atol=1e-4)
    assert 0.05 < dropped.float().mean() < 0.15  # augment's 10% feature dropout
    assert not (out.abs() < 1).any()
    assert torch.equal(augment_scaled(x, [5], "none", torch.Generator(), scaler), x)
