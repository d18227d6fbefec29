"""Generator data: 2-D toy distributions and digits as images."""

from __future__ import annotations

import numpy as np
import pytest

from stages.config import DataConfig
from stages.diffusion.data import GENERATOR_DATA, load_generator_data
from stages.errors import DistilError
from stages.modality import of_data
from stages.tasks.toy2d import TOY2D


@pytest.mark.parametrize("name", list(TOY2D))
def test_toy_sets_are_fixed_standardised_and_split_by_sizes(name):
    cfg = DataConfig(sizes=[400, 50, 100])
    data = load_generator_data(name, cfg)
    assert data.sample_shape == [2]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 400, "dev": 50, "test": 100}
    train = data.splits["train"]
    assert train.dtype == np.float32 and np.isfinite(train).all()
    assert np.allclose(train.mean(0), 0, atol=1e-5) and np.allclose(train.std(0), 1, atol=1e-3)
    again = load_generator_data(name, cfg)
    assert all(np.array_equal(data.splits[k], again.splits[k]) for k in data.splits)
    other = load_generator_data(name, DataConfig(sizes=[400, 50, 100], split_seed=1))
    assert not np.array_equal(data.splits["train"], other.splits["train"])
    assert not np.array_equal(data.splits["train"][:50], data.splits["test"][:50])


def test_toy_sets_differ_from_each_other():
    cfg = DataConfig(sizes=[300, 0, 0])
    sets = [load_generator_data(n, cfg).splits["train"] for n in TOY2D]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not np.allclose(sets[i], sets[j])


def test_eight_gaussians_has_eight_modes_and_checkerboard_empty_squares():
    x = load_generator_data("eight-gaussians", DataConfig(sizes=[2000, 0, 0])).splits["train"]
    angles = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)) % 8
    assert len(np.unique(angles)) == 8 and np.bincount(angles.astype(int)).min() > 150
    raw = load_generator_data("checkerboard", DataConfig(sizes=[3000, 0, 0]))
    board = raw.splits["train"] * np.asarray(raw.meta["std"]) + np.asarray(raw.meta["mean"])
    cells = (np.floor(board[:, 0]) + np.floor(board[:, 1])) % 2
    assert len(np.unique(cells)) == 1  # only one colour of the board is ever drawn


def test_digits_images_are_in_range_and_upsample():
    data = load_generator_data("digits-images", DataConfig())
    assert data.sample_shape == [1, 8, 8]
    x = np.concatenate(list(data.splits.values()))
    assert len(x) == 1797 and x.min() == -1.0 and x.max() == 1.0
    assert set(data.labels) == {"train", "dev", "test"} and len(data.labels["test"]) == len(data.splits["test"])
    big = load_generator_data("digits-images", DataConfig(image_size=16, limit=10))
    assert big.sample_shape == [1, 16, 16] and len(big.splits["train"]) == 10
    assert big.splits["train"].min() >= -1 and big.splits["train"].max() <= 1
    with pytest.raises(DistilError, match="image_size"):
        load_generator_data("digits-images", DataConfig(image_size=12))


def test_names_and_errors():
    assert set(GENERATOR_DATA) >= {"moons", "eight-gaussians", "checkerboard", "swiss-roll", "digits-images"}
    assert of_data("moons") == "diffusion" and of_data("digits") != "diffusion" and of_data("moonz") != "diffusion"
    with pytest.raises(DistilError, match="not generator data"):
        load_generator_data("moonz", DataConfig())
    with pytest.raises(DistilError, match="sizes"):
        load_generator_data("moons", DataConfig(sizes=[0, 1, 1]))
