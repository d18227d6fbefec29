"""Data for generators (diffusion teachers and their students): samples, no labels needed.

``load_generator_data(source, data_cfg)`` accepts

- a 2-D toy distribution (``moons``, ``eight-gaussians``, ``checkerboard``, ``swiss-roll``):
  ``sum(data.sizes)`` points drawn from ``data.split_seed``, cut into train/dev/test of
  ``data.sizes``, standardised with the train split's mean and std (kept in ``meta``);
- ``digits-images``: scikit-learn's digits as 1x8x8 images in [-1, 1] (``data.image_size:
  16`` upsamples), split as the ``digits`` task;
- diffusion teacher data written by ``generate-teacher-data`` (its final samples, all in
  ``train``): a student then learns from teacher samples instead of real data.

``data.limit`` keeps the first ``limit`` samples of each split, as for every other task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts import MANIFEST, read_manifest
from stages.config import DataConfig
from stages.errors import DistilError
from stages.tasks import GENERATOR_DATA, IMAGES
from stages.tasks.digits_images import digits_images
from stages.tasks.toy2d import TOY2D

TEACHER_DATA_KIND = "diffusion_teacher_data"
"""Manifest kind of generate-teacher-data's output for generator teachers."""


@dataclass
class GeneratorData:
    name: str
    sample_shape: list[int]
    splits: dict[str, np.ndarray]
    """Split name -> float32 samples [n, *sample_shape]."""
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    """Split name -> int64 class labels, when the data has them (digits-images)."""
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.splits.get(name, np.zeros((0, *self.sample_shape), np.float32)))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sample_shape": self.sample_shape, "rows": {k: len(v) for k, v in self.splits.items()},
                **self.meta}  # fmt: skip


def is_generator_source(source: str | Path) -> bool:
    name = str(source)
    if name in GENERATOR_DATA and not Path(name).exists():
        return True
    return is_teacher_data(source)


def is_teacher_data(source: str | Path) -> bool:
    """A folder of diffusion teacher data (generate-teacher-data's trajectories), not a dataset."""
    path = Path(source)
    return path.is_dir() and (path / MANIFEST).exists() and read_manifest(path).get("kind") == TEACHER_DATA_KIND


def generator_identity(source: str | Path) -> str:
    from stages.artifacts import artifact_hash

    return f"builtin:{source}" if str(source) in GENERATOR_DATA and not Path(source).exists() else artifact_hash(Path(source))


def load_generator_data(source: str | Path, data: DataConfig) -> GeneratorData:
    name = str(source)
    if name in TOY2D and not Path(name).exists():
        out = _toy(name, data)
    elif name in IMAGES and not Path(name).exists():
        x, y, split = digits_images(data)
        out = GeneratorData(name, list(x.shape[1:]), {s: x[split == s] for s in ("train", "dev", "test")},
                            {s: y[split == s] for s in ("train", "dev", "test")}, {"range": [-1.0, 1.0]})  # fmt: skip
    elif is_generator_source(source):
        out = _teacher_samples(Path(source))
    else:
        raise DistilError(
            f"data '{source}' is not generator data; use one of {', '.join(GENERATOR_DATA)} or diffusion teacher data"
        )
    if data.limit > 0:
        out.splits = {k: v[: data.limit] for k, v in out.splits.items()}
        out.labels = {k: v[: data.limit] for k, v in out.labels.items()}
    return out


def _toy(name: str, data: DataConfig) -> GeneratorData:
    if len(data.sizes) != 3 or min(data.sizes) < 0 or data.sizes[0] < 1:
        raise DistilError(f"data.sizes must be three counts [train, dev, test] with train >= 1, got {data.sizes}")
    rng = np.random.default_rng([data.split_seed, sorted(TOY2D).index(name)])
    x = TOY2D[name](sum(data.sizes), rng).astype(np.float64)
    n_train, n_dev, _ = data.sizes
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-8
    x = ((x - mean) / std).astype(np.float32)
    splits = {"train": x[:n_train], "dev": x[n_train : n_train + n_dev], "test": x[n_train + n_dev :]}
    return GeneratorData(name, [2], splits, meta={"mean": mean.tolist(), "std": std.tolist()})


def _teacher_samples(path: Path) -> GeneratorData:
    from stages.diffusion.teacher_data import read_final_samples

    x, manifest = read_final_samples(path)
    return GeneratorData(str(path), list(x.shape[1:]), {"train": x.numpy()},
                         meta={"teacher_data": str(path), "data": manifest.get("data", {})})  # fmt: skip
