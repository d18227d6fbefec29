"""Built-in data, user tables, augmentations and metrics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from stages.config import DataConfig
from stages.errors import DistilError
from stages.metrics import balanced_accuracy, ece, macro_f1, nll, reliability
from stages.tasks import load_examples
from stages.tasks.augment import augment
from stages.tasks.splits import stratified_split


def test_digits_split_is_stratified_fixed_and_complete():
    ex = load_examples("digits", DataConfig())
    assert ex.table.num_rows == 1797 and ex.num_classes == 10 and ex.input_shape == [1, 8, 8]
    again = load_examples("digits", DataConfig())
    assert ex.table.column("split").to_pylist() == again.table.column("split").to_pylist()
    other = load_examples("digits", DataConfig(split_seed=1))
    assert ex.table.column("split").to_pylist() != other.table.column("split").to_pylist()
    split = np.asarray(ex.table.column("split").to_pylist())
    labels = ex.table.column("label").to_numpy()
    assert abs((split == "test").mean() - 0.2) < 0.01 and abs((split == "dev").mean() - 0.15) < 0.01
    for c in range(10):  # every class in every split, in proportion
        share = (split[labels == c] == "test").mean()
        assert abs(share - 0.2) < 0.03
    x = np.stack(ex.table.column("features").to_numpy(zero_copy_only=False))
    assert x.min() == 0.0 and x.max() == 1.0


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(DistilError):
        stratified_split(np.zeros(10), 0.6, 0.5, 0)


def test_user_parquet_with_a_list_column_and_own_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((30, 4)).astype(np.float32)
    table = pa.table({"pix": list(x), "y": [i % 3 for i in range(30)], "part": ["train"] * 20 + ["dev"] * 5 + ["test"] * 5})
    pq.write_table(table, tmp_path / "u.parquet")
    ex = load_examples(tmp_path / "u.parquet", DataConfig(features=["pix"], label="y", split_column="part"))
    assert ex.input_shape == [4] and ex.num_classes == 3
    assert ex.split("dev").num_rows == 5
    np.testing.assert_allclose(np.stack(ex.table.column("features").to_numpy(zero_copy_only=False)), x)


def test_user_table_errors_name_the_problem(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0], "cls": ["x", "y"]}), tmp_path / "u.parquet")
    with pytest.raises(DistilError, match="no label column 'label'"):
        load_examples(tmp_path / "u.parquet", DataConfig())
    with pytest.raises(DistilError, match="no feature column"):
        load_examples(tmp_path / "u.parquet", DataConfig(label="cls", features=["b"]))
    with pytest.raises(DistilError, match="neither a built-in task"):
        load_examples(tmp_path / "missing", DataConfig())


@pytest.mark.parametrize("strength", ["weak", "strong"])
def test_augment_changes_inputs_keeps_shape_and_is_seeded(strength):
    x = torch.rand(16, 64)
    a = augment(x, [1, 8, 8], strength, torch.Generator().manual_seed(0))
    b = augment(x, [1, 8, 8], strength, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    flat = augment(x, [64], strength, torch.Generator().manual_seed(0))
    assert flat.shape == x.shape and not torch.equal(flat, x)
    assert torch.equal(augment(x, [1, 8, 8], "none", torch.Generator()), x)


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, 200))
    assert balanced_accuracy(pred, labels) == pytest.approx(balanced_accuracy_score(labels, pred))
    assert macro_f1(pred, labels, 4) == pytest.approx(f1_score(labels, pred, average="macro"))


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # 100 rows at confidence 0.8 of which exactly 80 are right: perfectly calibrated
    probs = np.tile([0.8, 0.2], (100, 1))
    labels = np.array([0] * 80 + [1] * 20)
    assert ece(probs, labels, 15) == pytest.approx(0.0, abs=1e-12)
    over = np.tile([0.99, 0.01], (100, 1))
    assert ece(over, labels, 15) == pytest.approx(0.19)
    bins = reliability(probs, labels, 15)
    assert sum(b["count"] for b in bins) == 100
    assert nll(probs, labels) == pytest.approx(-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)))


def test_long_tail_profile_is_exponential_train_only_and_idempotent():
    full = load_examples("digits", DataConfig())
    lt = load_examples("digits", DataConfig(long_tail=50))
    counts = np.bincount(lt.split("train").column("label").to_numpy(), minlength=10)
    assert counts[0] == np.bincount(full.split("train").column("label").to_numpy())[0]  # the head keeps every row
    assert all(counts[i] >= counts[i + 1] for i in range(9))
    assert counts[0] / counts[9] == pytest.approx(50, rel=0.25)
    assert lt.split("test").num_rows == full.split("test").num_rows and lt.split("dev").num_rows == full.split("dev").num_rows
    # applying the profile to an already long-tailed table keeps exactly the same rows
    from stages.tasks.splits import long_tail_keep

    t = lt.split("train")
    keep = long_tail_keep(t.column("id").to_numpy(), t.column("label").to_numpy(), 50, 10, 0)
    assert keep.all()


def test_shot_groups_and_expert_diversity():
    from stages.metrics import expert_metrics, shot_accuracy

    counts = np.array([100, 30, 5])
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 0, 0])
    groups = shot_accuracy(pred, labels, counts, many=50, few=15)
    assert groups == {"many_shot_accuracy": 1.0, "medium_shot_accuracy": 0.5, "few_shot_accuracy": 0.0}
    experts = np.array([[0, 0], [1, 0], [2, 2], [1, 1]])
    m = expert_metrics(experts, np.array([0, 1, 2, 0]))
    assert m["expert0_accuracy"] == 0.75 and m["expert1_accuracy"] == 0.5 and m["expert_disagreement"] == 0.25
