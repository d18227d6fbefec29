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

Diffusion teacher data is read here too (``read_trajectories``, ``read_final_samples``):
the ``part-NNNNN.parquet`` index and its ``_states/shard-NNNNN.safetensors`` shards, which
``stages.diffusion.teacher_data`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import DIFFUSION_TEACHER_DATA, MANIFEST, Kind, inspect_table, load_tensors, read_manifest
from stages.config import DataConfig
from stages.errors import DistilError
from stages.tasks import GENERATOR_DATA, IMAGES
from stages.tasks.digits_images import digits_images
from stages.tasks.toy2d import TOY2D

STATES = "_states"
"""Subdirectory of diffusion teacher data's safetensors shards (the leading underscore keeps
Parquet directory readers out of it)."""


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


def is_teacher_data(source: str | Path) -> bool:
    """A folder of diffusion teacher data (generate-teacher-data's trajectories), not a dataset."""
    path = Path(source)
    return path.is_dir() and (path / MANIFEST).exists() and read_manifest(path).get("kind") == Kind.DIFFUSION_TEACHER_DATA


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
    elif is_teacher_data(source):
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
    x, manifest = read_final_samples(path)
    return GeneratorData(str(path), list(x.shape[1:]), {"train": x.numpy()},
                         meta={"teacher_data": str(path), "data": manifest.get("data", {})})  # fmt: skip


def _index(path: Path, what: str):
    files, _, _, manifest = inspect_table(path, DIFFUSION_TEACHER_DATA, what)
    if manifest.get("kind") != Kind.DIFFUSION_TEACHER_DATA:
        raise DistilError(f"{path} is {manifest.get('kind') or 'not distil data'}, not generator teacher data")
    return files, manifest


def read_trajectories(path: str | Path) -> tuple[pa.Table, torch.Tensor, dict]:
    """(index table, states [rows, *shape] in the index's order, manifest) of generator
    teacher data; for data that fits in memory (the toy sets do)."""
    path = Path(path)
    files, manifest = _index(path, "generator teacher data")
    tables, states = [], []
    for f in files:
        shard = path / STATES / f.name.replace("part-", "shard-").replace(".parquet", ".safetensors")
        if not shard.is_file():
            raise DistilError(f"{path} has {f.name} but not its {shard.name}; regenerate the teacher data")
        table = pq.read_table(f)
        x = load_tensors(shard).get("states")
        if x is None or len(x) != table.num_rows or list(x.shape[1:]) != list(manifest.get("sample_shape", x.shape[1:])):
            raise DistilError(f"{shard} does not match its index {f.name}; regenerate the teacher data")
        tables.append(table)
        states.append(x)
    return pa.concat_tables(tables), torch.cat(states), manifest


def read_final_samples(path: str | Path) -> tuple[torch.Tensor, dict]:
    """The final samples [n, *shape] in sample order, and the manifest."""
    table, states, manifest = read_trajectories(path)
    final = np.flatnonzero(table.column("timestep").to_numpy() == -1)
    order = np.argsort(table.column("sample").to_numpy()[final], kind="stable")
    return states[torch.from_numpy(final[order])], manifest
