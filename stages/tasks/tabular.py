"""User tables: any Parquet or CSV with numeric feature columns (or one fixed-size list
column) and a label column.

Features are stored as read, unscaled: a classifier trained on them z-scores them itself
with its train split's statistics (``data.standardize``, ``stages.classifier.models``), so
every table derived from this one holds the same raw values each model expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.artifacts import EXAMPLES, list_column_to_numpy, read_any_table
from stages.config import DataConfig
from stages.errors import DistilError
from stages.tasks.splits import stratified_split


def load_user_table(path: Path, data: DataConfig) -> tuple[pa.Table, dict[str, Any]]:
    raw = read_any_table(path)
    if raw.num_rows == 0:
        raise DistilError(f"{path} is empty; pass a table with at least one row per class")
    names = raw.schema.names
    if data.label not in names:
        raise DistilError(f"{path} has no label column '{data.label}' (columns: {', '.join(names)}); set it with --label")
    reserved = {data.label, data.split_column, "id"}
    features = data.features or [n for n in names if n not in reserved]
    if not features:
        raise DistilError(f"{path} has no feature columns besides '{data.label}'; add some or name them with --features")
    missing = [f for f in features if f not in names]
    if missing:
        raise DistilError(f"{path} has no feature column(s) {', '.join(missing)}; set them with --features")
    x = _features(raw, features, path)

    label_col = raw.column(data.label)
    if label_col.null_count:
        raise DistilError(f"{path}: label column '{data.label}' has {label_col.null_count} empty value(s); drop those rows")
    if pa.types.is_integer(label_col.type):
        y = label_col.to_numpy().astype(np.int64)
        num_classes = int(y.max()) + 1
        class_names = [str(i) for i in range(num_classes)]
    elif pa.types.is_string(label_col.type) or pa.types.is_large_string(label_col.type):
        class_names = sorted(set(label_col.to_pylist()))
        index = {c: i for i, c in enumerate(class_names)}
        y = np.array([index[v] for v in label_col.to_pylist()], dtype=np.int64)
        num_classes = len(class_names)
    else:
        raise DistilError(f"{path}: label column '{data.label}' has type {label_col.type}; use integer class ids or strings")
    present = np.unique(y)
    if len(present) == 1:  # a classifier of one class learns nothing, yet trains and scores 100%
        only = label_col[0].as_py()
        raise DistilError(
            f"{path}: label column '{data.label}' holds a single class ({only!r}); a classifier needs rows of at least two"
        )

    if data.split_column:
        if data.split_column not in names:
            raise DistilError(f"{path} has no split column '{data.split_column}'; fix split_column or leave it empty")
        split = np.asarray(raw.column(data.split_column).to_pylist(), dtype=str)
        bad = sorted(set(split.tolist()) - {"train", "dev", "test"})  # words, not np.str_ reprs
        if bad:
            raise DistilError(f"{path}: split column holds {bad}; allowed values are train, dev, test")
    else:
        split = stratified_split(y, data.dev_frac, data.test_frac, data.split_seed)
    ids = (
        raw.column("id").to_numpy().astype(np.int64)
        if "id" in names and pa.types.is_integer(raw.schema.field("id").type)
        else np.arange(len(y))
    )
    table = pa.table(
        {"id": ids, "split": split, "label": y, "features": pa.array(list(x), type=pa.list_(pa.float32()))},
        schema=EXAMPLES,
    )
    meta = {"name": Path(path).stem, "num_classes": num_classes, "input_shape": [x.shape[1]], "class_names": class_names}
    return table, meta


def _features(raw: pa.Table, features: list[str], path: Path) -> np.ndarray:
    if len(features) == 1 and _is_list(raw.schema.field(features[0]).type):
        return list_column_to_numpy(raw.column(features[0]), f"{path} column '{features[0]}'")
    cols = []
    for name in features:
        col = raw.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DistilError(f"{path}: feature column '{name}' has type {col.type}; features must be numeric")
        if col.null_count:
            raise DistilError(f"{path}: feature column '{name}' has {col.null_count} empty value(s); fill or drop them")
        cols.append(pc.cast(col, pa.float32(), safe=False).to_numpy())  # ints beyond 2**24 round, as float32 does
    x = np.stack(cols, axis=1).astype(np.float32)
    if not np.isfinite(x).all():
        raise DistilError(f"{path}: features contain NaN or inf in {int((~np.isfinite(x).all(axis=1)).sum())} row(s); clean them")
    return x


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
