"""scikit-learn's digits as images for diffusion models: 1x8x8 in [-1, 1], optionally
upsampled (bilinear) to 1x16x16. Split as the ``digits`` classifier task splits them, so
a digits classifier's test split and these test images are the same digits."""

from __future__ import annotations

import numpy as np

from stages.config import DataConfig
from stages.errors import DistilError
from stages.tasks.splits import stratified_split


def digits_images(data: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 1, S, S] float32 in [-1, 1], labels [N], split names [N])."""
    from sklearn.datasets import load_digits

    if data.image_size not in (8, 16):
        raise DistilError(f"data.image_size must be 8 (native) or 16 (upsampled) for digits-images, got {data.image_size}")
    bunch = load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32)  # pixel values 0..16 -> [-1, 1]
    if data.image_size == 16:
        import torch

        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=16, mode="bilinear", align_corners=False).numpy()
    y = bunch.target.astype(np.int64)
    return x, y, stratified_split(y, data.dev_frac, data.test_frac, data.split_seed)
