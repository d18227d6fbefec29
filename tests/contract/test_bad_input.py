"""Bad input: one line naming the problem, exit code 2, no traceback, nothing at --out."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _rewrite(src, dst, fn):
    """Copy a distil table, transforming its Arrow table with ``fn``."""
    dst.mkdir()
    for part in sorted(src.glob("part-*.parquet")):
        pq.write_table(fn(pq.read_table(part)), dst / part.name)
    (dst / "_manifest.json").write_text((src / "_manifest.json").read_text())
    return dst


def _assert_nothing_written(out):
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


def test_missing_input_file(cli, tmp_path):
    cli.fails("select", tmp_path / "nope", "--out", tmp_path / "o", match="does not exist")
    _assert_nothing_written(tmp_path / "o")


def test_not_a_parquet_file(cli, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("hello")
    cli.fails("select", bad, "--out", tmp_path / "o", match="not a Parquet file")
    cli.fails("distill", "--method", "ce", "--data", bad, "--out", tmp_path / "o", match="cannot read")
    _assert_nothing_written(tmp_path / "o")


def test_missing_column(cli, tiny_run, tmp_path):
    src = _rewrite(tiny_run["tdata"], tmp_path / "nologits", lambda t: t.drop(["logits"]))
    cli.fails("select", src, "--out", tmp_path / "o", match="no column 'logits'")
    _assert_nothing_written(tmp_path / "o")


def test_mistyped_column(cli, tiny_run, tmp_path):
    src = _rewrite(
        tiny_run["tdata"],
        tmp_path / "strlabel",
        lambda t: t.set_column(2, "label", pa.array([str(v) for v in t.column("label").to_pylist()])),
    )
    cli.fails("select", src, "--out", tmp_path / "o", match="column 'label' has type string")
    _assert_nothing_written(tmp_path / "o")


def test_nan_logits(cli, tiny_run, tmp_path):
    def poison(t):
        logits = np.stack(t.column("logits").to_numpy(zero_copy_only=False)).copy()
        logits[0, 3] = np.nan
        return t.set_column(4, "logits", pa.array(list(logits), type=pa.list_(pa.float32())))

    src = _rewrite(tiny_run["tdata"], tmp_path / "nan", poison)
    cli.fails("select", src, "--out", tmp_path / "o", match="NaN")
    cli.fails("distill", "--method", "kd", "--data", src, "--out", tmp_path / "o", match="NaN")
    _assert_nothing_written(tmp_path / "o")


def test_empty_cells_in_user_csv(cli, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b,label\n1,2,0\n,3,1\n4,5,0\n6,7,1\n")
    cli.fails("distill", "--method", "ce", "--data", csv, "--out", tmp_path / "o", match="empty value")


def test_inf_features_in_user_csv(cli, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b,label\n1,2,0\ninf,3,1\n4,5,0\n6,7,1\n")
    cli.fails("distill", "--method", "ce", "--data", csv, "--out", tmp_path / "o", match="NaN or inf")
    _assert_nothing_written(tmp_path / "o")


def test_empty_table(cli, tiny_run, tmp_path):
    src = _rewrite(tiny_run["tdata"], tmp_path / "empty", lambda t: t.slice(0, 0))
    cli.fails("select", src, "--out", tmp_path / "o", match="empty")
    empty_csv = tmp_path / "e.csv"
    empty_csv.write_text("a,label\n")
    cli.fails("distill", "--method", "ce", "--data", empty_csv, "--out", tmp_path / "o", match="empty")
    _assert_nothing_written(tmp_path / "o")


def test_unknown_method_and_selector_and_policy(cli, tiny_run, tmp_path):
    cli.fails("distill", "--method", "magic", "--data", "digits", "--out", tmp_path / "o", match="unknown method 'magic'")
    cli.fails("select", tiny_run["tdata"], "--by", "magic", "--out", tmp_path / "o", match="unknown selection")
    cli.fails("cascade", "--student", tiny_run["teacher"], "--teacher", tiny_run["teacher"], "--data", tiny_run["tdata"],
              "--policy", "magic", "--out", tmp_path / "o", match="unknown policy")  # fmt: skip
    _assert_nothing_written(tmp_path / "o")


def test_unknown_params_key(cli, tmp_path):
    cli.fails(
        "distill", "--data", "digits", "--out", tmp_path / "o", "--set", "learning_rate=1", match="unknown key(s) learning_rate"
    )
    cli.fails("distill", "--data", "digits", "--out", tmp_path / "o", "--set", "model.heads=2", match="unknown key(s) heads")
    (tmp_path / "p.yaml").write_text("distill:\n  epocs: 3\n")
    cli.fails("distill", "--data", "digits", "--out", tmp_path / "o", "--params", tmp_path / "p.yaml", match="epocs")
    _assert_nothing_written(tmp_path / "o")


def test_mistyped_param_value(cli, tmp_path):
    cli.fails("distill", "--data", "digits", "--out", tmp_path / "o", "--set", "epochs=many", match="must be int")


def test_labels_the_teacher_never_saw(cli, tiny_run, tmp_path):
    csv = tmp_path / "x.csv"
    rows = [",".join([f"f{i}" for i in range(64)] + ["label"])]
    rng = np.random.default_rng(0)
    for i in range(40):
        rows.append(",".join([f"{v:.3f}" for v in rng.random(64)] + [str(10 + i % 2)]))
    csv.write_text("\n".join(rows) + "\n")
    cli.fails(
        "generate-teacher-data",
        "--teacher",
        tiny_run["teacher"],
        "--data",
        csv,
        "--out",
        tmp_path / "o",
        match="knows only 10 classes",
    )
    _assert_nothing_written(tmp_path / "o")


def test_kd_without_teacher_logits(cli, tmp_path):
    cli.fails("distill", "--method", "kd", "--data", "digits", "--out", tmp_path / "o", match="needs teacher logits")


def test_missing_teacher_model(cli, tmp_path):
    cli.fails(
        "generate-teacher-data",
        "--teacher",
        tmp_path / "none",
        "--data",
        "digits",
        "--out",
        tmp_path / "o",
        match="not a distil model",
    )
    _assert_nothing_written(tmp_path / "o")


def test_bad_params_file(cli, tmp_path):
    (tmp_path / "p.yaml").write_text("distill: [1, 2\n")
    cli.fails("distill", "--data", "digits", "--out", tmp_path / "o", "--params", tmp_path / "p.yaml", match="not valid YAML")
    cli.fails("distill", "--data", "digits", "--out", tmp_path / "o", "--params", tmp_path / "missing.yaml", match="not found")


@pytest.mark.parametrize("device", ["tpu"])
def test_unknown_device(cli, tmp_path, device):
    cli.fails(
        "distill", "--method", "ce", "--data", "digits", "--out", tmp_path / "o", "--device", device, match="unknown device"
    )
