"""Generator metrics (stages.diffusion.metrics) and the generator evaluation table
(stages.diffusion.evaluate), with a fake sampler: no diffusion model is trained here."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.config import DataConfig, EvaluateConfig
from stages.diffusion.evaluate import evaluate_generators
from stages.diffusion.metrics.digits_features import (
    DigitsClassifier,
    accuracy,
    class_coverage,
    digit_features,
    frechet_torchmetrics,
    load_digits_classifier,
    save_digits_classifier,
    train_digits_classifier,
)
from stages.diffusion.metrics.distances import (
    frechet_between,
    frechet_distance,
    holdout_split,
    mmd2,
    mmd_bandwidths,
    paired_error,
    sliced_wasserstein,
)
from stages.diffusion.metrics.manifold import knn_radii, manifold_metrics
from stages.diffusion.metrics.plots import grid_size, write_image_grid, write_scatter_grid
from stages.diffusion.metrics.timing import seconds_per_1k
from stages.diffusion.metrics.toy_modes import mode_coverage, normalised_entropy, toy_modes
from stages.errors import DistilError
from stages.modality import of_model
from stages.tasks.digits_images import digits_images
from stages.tasks.toy2d import TOY2D


def toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    return TOY2D[name](n, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y, split = digits_images(DataConfig())
    return {s: (x[split == s], y[split == s]) for s in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def clf(digits) -> DigitsClassifier:
    return train_digits_classifier(*digits["train"], seed=0)


# ---- sliced Wasserstein ---------------------------------------------------------------


def test_sw_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 2))
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)  # order does not matter


def test_sw_of_a_shifted_set_is_the_projected_shift():
    # every 1-D projection of x + d is the projection of x shifted by theta.d, so
    # SW_2 = sqrt(mean_theta (theta.d)^2) = |d| / sqrt(2) and SW_1 = mean |theta.d| = 2 |d| / pi
    x = np.random.default_rng(0).normal(size=(400, 2))
    d = np.array([3.0, -1.0])
    assert sliced_wasserstein(x, x + d) == pytest.approx(np.linalg.norm(d) / np.sqrt(2), rel=1e-9)
    assert sliced_wasserstein(x, x + d, p=1) == pytest.approx(2 * np.linalg.norm(d) / np.pi, rel=1e-3)


def test_sw_of_independent_shifted_gaussians_and_its_floor():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3000, 2)), rng.normal(size=(3000, 2)) + [2.0, 0.0]
    assert sliced_wasserstein(x, y) == pytest.approx(2.0 / np.sqrt(2), rel=0.05)
    ref, hold = holdout_split(x, seed=0)
    floor = sliced_wasserstein(hold, ref)
    assert floor < 0.1 < sliced_wasserstein(x, y) / 10
    assert sliced_wasserstein(x, y) == sliced_wasserstein(x, y)  # fixed projections: deterministic
    hi = rng.normal(size=(300, 5))  # d > 2: seeded random directions
    assert sliced_wasserstein(hi, hi + 1.0, seed=3) == sliced_wasserstein(hi, hi + 1.0, seed=3)


def test_sw_rejects_bad_input():
    with pytest.raises(DistilError, match="NaN"):
        sliced_wasserstein(np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros((3, 2)))
    with pytest.raises(DistilError, match="dimension"):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((3, 3)))


# ---- MMD ------------------------------------------------------------------------------


def test_mmd_near_zero_for_the_same_distribution_and_clearly_positive_when_shifted():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 2)), rng.normal(size=(600, 2))
    bw = mmd_bandwidths(x)
    same, shifted = mmd2(x, y, bw), mmd2(x, y + [1.0, 0.0], bw)
    assert abs(same) < 0.005
    assert shifted > 0.05 and shifted > 20 * abs(same)


def test_mmd_is_scale_equivariant_with_the_median_bandwidths():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(150, 2)) + 0.5
    assert mmd2(5 * x, 5 * y, mmd_bandwidths(5 * x)) == pytest.approx(mmd2(x, y, mmd_bandwidths(x)), rel=1e-9)


# ---- Frechet distance -----------------------------------------------------------------


def test_frechet_distance_known_answers():
    mu, eye = np.zeros(3), np.eye(3)
    assert frechet_distance(mu, eye, mu, eye) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, eye, mu + [1.0, 2.0, 2.0], eye) == pytest.approx(9.0)  # |d|^2
    assert frechet_distance(mu, eye, mu, 4 * eye) == pytest.approx(3.0)  # tr(I + 4I - 2 * 2I)


def test_digits_classifier_accuracy(digits, clf):
    assert accuracy(clf, *digits["test"]) > 0.9


def test_frechet_of_digits_train_vs_test_is_small_and_of_noise_large(digits, clf):
    train, test = digits["train"][0], digits["test"][0]
    noise = np.random.default_rng(0).uniform(-1, 1, size=(400, 1, 8, 8)).astype(np.float32)
    floor = frechet_torchmetrics(clf, train, test)
    bad = frechet_torchmetrics(clf, train, noise)
    assert floor < 10.0
    assert bad > 100.0 and bad > 20 * floor
    # torchmetrics (custom feature module) and scipy's sqrtm agree
    ours = frechet_between(digit_features(clf, train), digit_features(clf, test))
    assert ours == pytest.approx(floor, rel=1e-3)


def test_precision_recall_density_coverage_tell_fidelity_from_diversity():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1200, 8))
    same = manifold_metrics(real, rng.normal(size=(1000, 8)))
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.8 and 0.85 < same["density"] < 1.2
    collapsed = manifold_metrics(real, 0.3 * rng.normal(size=(1000, 8)))  # every sample typical, most of the data missed
    assert collapsed["precision"] > 0.99 and collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.4 < collapsed["density"] - 1
    spread = manifold_metrics(real, 2 * rng.normal(size=(1000, 8)))  # the data covered, most samples atypical
    assert spread["recall"] > 0.99 and spread["precision"] < 0.3 and spread["density"] < 0.2
    with pytest.raises(DistilError, match="one width"):
        manifold_metrics(real, real[:, :4])
    with pytest.raises(DistilError, match="more than 3"):
        manifold_metrics(real, real[:3])


def test_a_sample_is_not_its_own_neighbour_and_a_point_on_a_ball_edge_counts():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    got = manifold_metrics(x.numpy(), np.array([[0.0], [1.0], [3.0], [6.0], [20.0]]), k=1)
    assert got["precision"] == pytest.approx(4 / 5) and got["coverage"] == 1.0 and got["density"] == pytest.approx(8 / 5)


def test_class_coverage_of_digits(digits, clf):
    x, y = digits["test"]
    full = class_coverage(clf, x)
    assert full["class_entropy"] > 0.95 and full["classes_covered"] == 10 and full["confidence"] > 0.8
    threes = class_coverage(clf, x[y == 3])
    assert np.argmax(threes["class_counts"]) == 3 and threes["class_entropy"] < 0.2
    assert threes["classes_covered"] < 5  # a stray misclassification of 36 images still passes 10% of 3.6


def test_digits_classifier_safetensors_roundtrip_and_16px_input(tmp_path, digits, clf):
    save_digits_classifier(clf, tmp_path / "clf.safetensors", {"seed": 0})
    back = load_digits_classifier(tmp_path / "clf.safetensors")
    x = digits["test"][0][:20]
    assert np.allclose(digit_features(back, x), digit_features(clf, x))
    assert list(DigitsClassifier(16).prepare(torch.zeros(3, 64)).shape) == [3, 1, 16, 16]  # 8x8 rows read as 16x16
    with pytest.raises(DistilError, match="not a distil digits classifier"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_digits_classifier(tmp_path / "other.safetensors")


# ---- mode coverage --------------------------------------------------------------------


def test_samples_on_the_eight_centres_cover_eight_modes_with_entropy_one():
    modes = toy_modes("eight-gaussians", toy("eight-gaussians", 4000))
    assert modes.n_modes == 8
    on_centres = np.repeat(modes.centres, 50, axis=0)
    c = mode_coverage(on_centres, modes)
    assert c["modes_covered"] == 8 and c["mode_entropy"] == pytest.approx(1.0) and c["hq_rate"] == 1.0
    one = mode_coverage(np.repeat(modes.centres[:1], 400, axis=0), modes)
    assert one["modes_covered"] == 1 and one["mode_entropy"] == pytest.approx(0.0)
    far = mode_coverage(on_centres + 100.0, modes)
    assert far["hq_rate"] == 0.0 and far["modes_covered"] == 0 and far["mode_entropy"] == 0.0


@pytest.mark.parametrize("name,k", [("eight-gaussians", 8), ("moons", 2), ("checkerboard", 8), ("swiss-roll", 8)])
def test_real_data_covers_every_mode_whatever_its_scale(name, k):
    real, fresh = toy(name, 4000, 0), toy(name, 2000, 1)
    base = mode_coverage(fresh, toy_modes(name, real))
    assert base["n_modes"] == k and base["modes_covered"] == k
    assert base["mode_entropy"] > 0.97 and base["hq_rate"] > 0.95
    scale, shift = np.array([0.3, 2.0]), np.array([-1.0, 4.0])  # standardised, divided by 5, ...: a per-axis affine map
    moved = mode_coverage(fresh * scale + shift, toy_modes(name, real * scale + shift))
    assert moved["mode_hq_counts"] == pytest.approx(base["mode_hq_counts"], abs=0.01 * len(fresh))


def test_one_moon_is_one_mode():
    from sklearn.datasets import make_moons

    x, y = make_moons(3000, noise=0.05, random_state=0)
    modes = toy_modes("moons", x)
    c = mode_coverage(x[y == 0][:500], modes)
    assert c["modes_covered"] == 1 and c["mode_entropy"] < 0.05


def test_normalised_entropy():
    assert normalised_entropy([5, 5, 5, 5], 4) == pytest.approx(1.0)
    assert normalised_entropy([0, 7, 0, 0], 4) == 0.0
    assert normalised_entropy([0, 0], 2) == 0.0


# ---- paired error, plots, timing ------------------------------------------------------


def test_paired_error():
    a = np.random.default_rng(0).normal(size=(50, 1, 4, 4))
    assert paired_error(a, a) == 0.0
    assert paired_error(a, a + 0.5) == pytest.approx(0.5 * 4)  # |0.5 * ones(16)| = 2 per sample
    with pytest.raises(DistilError, match="same shape"):
        paired_error(a, a[:10])


def test_image_grid_png_has_the_expected_size(tmp_path):
    rows = [np.random.default_rng(i).uniform(-1, 1, size=(5, 1, 8, 8)) for i in range(3)]
    size = write_image_grid(tmp_path / "grid.png", rows, scale=4, pad=2)
    assert size == grid_size(3, 5, 8, 8, scale=4, pad=2) == (5 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == size and im.format == "PNG"
    labelled = write_image_grid(tmp_path / "labelled.png", rows, labels=["a", "b", "c"], label_width=40)
    with Image.open(tmp_path / "labelled.png") as im:
        assert im.size == labelled == grid_size(3, 5, 8, 8, label_width=40)


def test_scatter_grid_png(tmp_path):
    real = toy("moons", 1000)
    size = write_scatter_grid(tmp_path / "s.png", [[real, None], [real + 0.1, real]], real, panel=100)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == size == (2 * 104 + 4, 2 * 104 + 4)
        assert len(set(im.getdata())) >= 3  # background, real data, samples


def test_seconds_per_1k_charges_only_the_marginal_cost():
    def fn(k: int) -> None:  # 20 ms fixed (loading) + 0.2 ms per sample
        time.sleep(0.02 + 2e-4 * k)

    s = seconds_per_1k(fn, n=100, repeats=2)
    assert 0.12 < s < 0.35  # 0.2 s per 1k; the 20 ms fixed cost would add 0.2 s per 1k at n = 100


# ---- the generator evaluation table ---------------------------------------------------


def _generator(root: Path, name: str, scheduler: str = "LCMScheduler") -> Path:
    d = root / name
    (d / "scheduler").mkdir(parents=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler}))
    (d / "model_index.json").write_text(
        json.dumps({"model": ["stages.diffusion.models", "MLPDenoiser"], "scheduler": ["diffusers", scheduler]})
    )
    return d


class FakeSampler:
    """Sample i from noise seeded seed + i, as the real sampler does. 'good' maps noise to
    the data, better with more steps; 'bad' returns its noise; any other model the data."""

    def __init__(self, real: np.ndarray, images: bool = False):
        self.real, self.images, self.calls = real, images, []

    def __call__(self, path, n, steps, seed, hybrid_first_step_teacher=None, *, solver="ddim", device="cpu"):
        self.calls.append(
            {"model": Path(path).name, "n": n, "steps": steps, "hybrid": hybrid_first_step_teacher, "solver": solver}
        )
        shape = self.real.shape[1:]
        z = np.stack([np.random.default_rng(seed + i).standard_normal(shape) for i in range(n)])
        data = self.real[np.array([np.random.default_rng(seed + i).integers(len(self.real)) for i in range(n)])]
        if Path(path).name == "bad":
            return torch.from_numpy(z).float()
        w = 1.0 / (steps + 1) if Path(path).name == "good" else 0.0
        return torch.from_numpy((1 - w) * data + w * z).float()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_generators_builds_one_table_for_2d_toys(tmp_path):
    real = {"train": toy("moons", 2000, 0), "test": toy("moons", 400, 1)}
    models = [_generator(tmp_path, "good"), _generator(tmp_path, "bad")]
    teacher = _generator(tmp_path, "teacher", "DDPMScheduler")
    sampler = FakeSampler(real["train"])
    cfg = EvaluateConfig(n_samples=300, teacher_steps=50, time_samples=8, hybrid_first_step=str(teacher))
    out = evaluate_generators(models, "moons", [1, 2], cfg, tmp_path / "eval", teacher=teacher, sampler=sampler, real=real,
                              console=None)  # fmt: skip

    rows = _read_csv(out / "generators.csv")
    assert [(r["model"], r["steps"]) for r in rows] == [("good", "1"), ("good", "2"), ("bad", "1"), ("bad", "2"), ("good+hybrid", "2"), ("bad+hybrid", "2")]  # fmt: skip
    assert list(rows[0]) == ["model", "steps", "n", "nonfinite_rate", "sw", "sw_floor", "sw_at_floor_n", "mmd2", "mmd2_floor",
                             "hq_rate", "hq_rate_floor", "modes_covered", "n_modes", "mode_entropy", "mode_entropy_floor",
                             "paired_error", "seconds_per_1k"]  # fmt: skip
    good, bad = {r["steps"]: r for r in rows if r["model"] == "good"}, {r["steps"]: r for r in rows if r["model"] == "bad"}
    assert float(good["2"]["sw"]) < float(good["1"]["sw"]) < float(bad["1"]["sw"])
    assert float(good["2"]["paired_error"]) < float(bad["2"]["paired_error"])
    assert float(rows[0]["sw_floor"]) < float(bad["1"]["sw"]) / 5
    assert int(good["2"]["modes_covered"]) == 2 and float(rows[0]["hq_rate_floor"]) > 0.95
    assert all(float(r["seconds_per_1k"]) > 0 for r in rows)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {f"{m}/steps_{k}" for m, k in [("good", 1), ("good", 2), ("bad", 1), ("bad", 2)]} | {"good+hybrid/steps_2", "bad+hybrid/steps_2", "floor"}  # fmt: skip
    assert metrics["floor"]["floor_n"] == 300 and "sw" in metrics["floor"]
    assert all(isinstance(v, (int, float)) for v in metrics["good/steps_1"].values())
    assert (out / "plots" / "samples.png").is_file() and (out / "plots" / "modes.csv").is_file()
    assert (out / "summary.txt").read_text().count("good") >= 2
    hybrid_calls = [c for c in sampler.calls if c["hybrid"] is not None]
    assert hybrid_calls and all(c["steps"] >= 2 and Path(c["hybrid"]) == teacher for c in hybrid_calls)
    assert {c["solver"] for c in sampler.calls} == {"ddim"}
    assert any(c["model"] == "teacher" and c["steps"] == 50 for c in sampler.calls)


def test_evaluate_generators_for_digits(tmp_path, digits, clf):
    test_images = digits["test"][0]
    models = [_generator(tmp_path, "exact"), _generator(tmp_path, "bad")]
    cfg = EvaluateConfig(n_samples=200, time_samples=0)
    out = evaluate_generators(
        models, "digits-images", [1], cfg, tmp_path / "eval", sampler=FakeSampler(test_images), classifier=clf
    )
    rows = _read_csv(out / "generators.csv")
    assert list(rows[0]) == ["model", "steps", "n", "nonfinite_rate", "fd", "fd_floor", "fd_at_floor_n", "class_entropy",
                             "class_entropy_floor", "classes_covered", "confidence", "confidence_floor", "precision",
                             "precision_floor", "recall", "recall_floor", "density", "coverage", "coverage_floor"]  # fmt: skip
    good, bad = rows
    assert float(good["fd"]) < 20 < float(bad["fd"])
    assert float(good["precision"]) > 0.7 > 0.1 > float(bad["precision"]) and float(good["recall"]) > float(bad["recall"])
    assert float(good["confidence"]) > float(bad["confidence"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["floor"]["classifier_test_accuracy"] > 0.9
    assert (out / "digits_classifier.safetensors").is_file() and (out / "plots" / "classes.csv").is_file()
    with Image.open(out / "plots" / "samples.png") as im:
        assert im.size[1] == grid_size(3, 16, 8, 8)[1]  # good, bad and the real test row


def test_nonfinite_samples_are_counted_not_fatal(tmp_path):
    real = {"train": toy("eight-gaussians", 1000, 0)}  # no test split: the floor uses half of train

    def sampler(path, n, steps, seed):
        x = toy("eight-gaussians", n, seed)
        x[:10] = np.nan
        return x

    cfg = EvaluateConfig(n_samples=100, time_samples=0)
    out = evaluate_generators(
        [_generator(tmp_path, "g")], "eight-gaussians", [1], cfg, tmp_path / "e", sampler=sampler, real=real
    )
    (row,) = _read_csv(out / "generators.csv")
    assert float(row["nonfinite_rate"]) == pytest.approx(0.1) and row["n"] == "90" and float(row["sw"]) < 0.5


def test_bad_generator_input(tmp_path):
    real = {"train": toy("moons", 200), "test": toy("moons", 50)}
    g = _generator(tmp_path, "g")
    (tmp_path / "plain").mkdir()
    cfg = EvaluateConfig(n_samples=50, time_samples=0)
    with pytest.raises(DistilError, match="not a generator folder"):
        evaluate_generators(
            [tmp_path / "plain"], "moons", [1], cfg, tmp_path / "o", sampler=FakeSampler(real["train"]), real=real
        )
    with pytest.raises(DistilError, match="positive integers"):
        evaluate_generators([g], "moons", [0], cfg, tmp_path / "o", sampler=FakeSampler(real["train"]), real=real)
    with pytest.raises(DistilError, match="returned shape"):
        evaluate_generators([g], "moons", [1], cfg, tmp_path / "o", sampler=lambda p, n, k, s: np.zeros((n - 1, 2)), real=real)
    assert not (tmp_path / "o").exists()
    assert of_model(g) == "diffusion" and of_model(tmp_path / "plain") != "diffusion"


def test_cli_evaluate_dispatches_generator_folders(tmp_path, cli, monkeypatch):
    import stages.diffusion.evaluate as eg

    monkeypatch.setattr(eg, "_default_sampler", lambda: FakeSampler(toy("moons", 500)))
    g1, g2 = _generator(tmp_path, "good"), _generator(tmp_path, "bad")
    out = tmp_path / "eval"
    cli.ok("evaluate", "--model", g1, "--model", g2, "--data", "moons", "--out", out, "-q",
           "--set", "step_counts=[1,4]", "--set", "n_samples=100", "--set", "time_samples=0")  # fmt: skip
    assert [(r["model"], r["steps"]) for r in _read_csv(out / "generators.csv")] == [("good", "1"), ("good", "4"), ("bad", "1"), ("bad", "4")]  # fmt: skip
    cli.fails(
        "evaluate", "--model", g1, "--model", tmp_path / "plain", "--data", "moons", "--out", tmp_path / "x", match="on their own"
    )
