"""scikit-learn's digits: 1,797 8x8 grey images of 10 digits, shipped with the package;
optionally under one or several domain transformations (``data.domains``,
``stages.tasks.domains``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from stages.artifacts import EXAMPLES
from stages.config import DataConfig
from stages.tasks.domains import DOMAIN_STRIDE, apply_domain, check_domains
from stages.tasks.splits import stratified_split


def load_digits(data: DataConfig) -> tuple[pa.Table, dict[str, Any]]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    split = stratified_split(y, data.dev_frac, data.test_frac, data.split_seed)
    domains = list(data.domains) or ["none"]
    check_domains(domains)
    ids = np.arange(len(y), dtype=np.int64)
    parts = [apply_domain(d, x.reshape(-1, 8, 8)).reshape(len(y), -1) for d in domains]
    table = pa.table(
        {
            "id": pa.array(np.concatenate([ids + DOMAIN_STRIDE * i for i in range(len(domains))])),
            "split": pa.array(np.tile(split, len(domains))),
            "label": pa.array(np.tile(y, len(domains))),
            "features": pa.array(list(np.concatenate(parts)), type=pa.list_(pa.float32())),
        },
        schema=EXAMPLES,
    )
    meta = {"name": "digits", "num_classes": 10, "input_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)]}
    if data.domains:
        meta["domains"] = domains
    return table, meta
