"""scikit-learn's digits: 1,797 8x8 grey images of 10 digits, shipped with the package."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from stages.artifacts import EXAMPLES
from stages.config import DataConfig
from stages.tasks.splits import stratified_split


def load_digits(data: DataConfig) -> tuple[pa.Table, dict[str, Any]]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    split = stratified_split(y, data.dev_frac, data.test_frac, data.split_seed)
    table = pa.table(
        {
            "id": pa.array(np.arange(len(y), dtype=np.int64)),
            "split": pa.array(split),
            "label": pa.array(y),
            "features": pa.array(list(x), type=pa.list_(pa.float32())),
        },
        schema=EXAMPLES,
    )
    meta = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)]}
    return table, meta
