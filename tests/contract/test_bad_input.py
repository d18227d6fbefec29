"""Bad input: one line naming the problem, exit code 2, no traceback, nothing at --out."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import get_type_hints

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from conftest import TINY

from distilcli.options import handled
from stages.config import (
    CascadeConfig,
    DataConfig,
    DiffusionConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateTeacherDataConfig,
    LMConfig,
    ModelConfig,
    Range,
    SelectConfig,
    from_dict,
)
from stages.errors import DistilError


def _rewrite(src, dst, fn):
    """Copy a distil table, transforming its Arrow table with ``fn``."""
    dst.mkdir()
    for part in sorted(src.glob("part-*.parquet")):
        pq.write_table(fn(pq.read_table(part)), dst / part.name)
    (dst / ".manifest.json").write_text((src / ".manifest.json").read_text())
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


# ---- declared ranges of numeric settings ------------------------------------------------

CONFIGS = (DataConfig, ModelConfig, LMConfig, DiffusionConfig,
           GenerateTeacherDataConfig, SelectConfig, DistillConfig, CascadeConfig, EvaluateConfig)  # fmt: skip
RANGED = [(cls, f) for cls in CONFIGS for f in dataclasses.fields(cls) if f.metadata.get("valid") is not None]


def _item_type(cls, f):
    hint = get_type_hints(cls)[f.name]
    return hint.__args__[0] if getattr(hint, "__origin__", None) is list else hint


def _as_field_value(cls, f, v):
    v = int(v) if _item_type(cls, f) is int else float(v)
    return [v] if getattr(get_type_hints(cls)[f.name], "__origin__", None) is list else v


def _outside(cls, f):
    """(bound name, a value just outside that bound) for each declared bound of the field."""
    valid, step = f.metadata["valid"], 1 if _item_type(cls, f) is int else 1e-6
    if valid.low is not None:
        yield "low", valid.low if valid.low_open else valid.low - step
    if valid.high is not None:
        yield "high", valid.high if valid.high_open else valid.high + step


def test_ranges_are_declared_for_the_numeric_settings():
    assert len(RANGED) >= 120
    declared = {(cls.__name__, f.name) for cls, f in RANGED}
    for key in [("EvaluateConfig", "bins"), ("DistillConfig", "epochs"), ("DistillConfig", "batch_size"), ("DistillConfig", "lr"),
                ("GenerateTeacherDataConfig", "shard_rows"), ("GenerateTeacherDataConfig", "samples"),
                ("LMConfig", "max_new_tokens"), ("DataConfig", "dev_frac"), ("CascadeConfig", "threshold")]:  # fmt: skip
        assert key in declared, key
    for cls, f in RANGED:  # only numbers (or lists of numbers) declare a range
        assert _item_type(cls, f) in (int, float), f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("cls,f", RANGED, ids=[f"{c.__name__}.{f.name}" for c, f in RANGED])
def test_every_default_lies_in_its_declared_range(cls, f):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    items = default if isinstance(default, list) else [default]
    assert all(v in f.metadata["valid"] for v in items), f"{cls.__name__}.{f.name} = {default} not {f.metadata['valid']}"
    assert from_dict(cls, {f.name: default}, "s") == cls(**{f.name: default})


BOUNDS = [(cls, f, side, v) for cls, f in RANGED for side, v in _outside(cls, f)]


@pytest.mark.parametrize("cls,f,side,value", BOUNDS, ids=[f"{c.__name__}.{f.name}-{s}" for c, f, s, _ in BOUNDS])
def test_a_value_just_outside_a_declared_bound_is_refused(cls, f, side, value):
    valid = f.metadata["valid"]
    assert value not in valid.also
    bad = _as_field_value(cls, f, value)
    with pytest.raises(DistilError) as exc:
        from_dict(cls, {f.name: bad}, "s")
    msg = str(exc.value)
    assert msg.startswith(f"params s.{f.name} must be ") and str(valid) in msg and msg.endswith(f"got {bad}"), msg
    bound = valid.low if side == "low" else valid.high
    closed = not (valid.low_open if side == "low" else valid.high_open)
    if closed:  # the bound itself is valid
        from_dict(cls, {f.name: _as_field_value(cls, f, bound)}, "s")
    for sentinel in valid.also:  # and so are the sentinels (-1 = calibrate, 0 = off)
        from_dict(cls, {f.name: _as_field_value(cls, f, sentinel)}, "s")


def test_range_wording_and_nan():
    assert str(Range(1)) == ">= 1" and str(Range(0, low_open=True)) == "> 0"
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and str(Range(0, 1, high_open=True)) == "in [0, 1)"
    assert str(Range(0, 1, also=(-1,))) == "in [0, 1] or -1" and str(Range(high=2)) == "<= 2"
    assert float("nan") not in Range(0) and -1 in Range(0, 1, also=(-1,)) and -0.5 not in Range(0, 1, also=(-1,))
    with pytest.raises(DistilError, match=r"^params distill.lr must be > 0, got nan$"):
        from_dict(DistillConfig, {"lr": float("nan")}, "distill")
    with pytest.raises(DistilError, match=r"^params d.diffusion.channels must be a list of numbers >= 1, got \[8, 0\]$"):
        from_dict(DistillConfig, {"diffusion": {"channels": [8, 0]}}, "d")


SECTION_CLASSES = {
    DataConfig: ("data", "student_data"),
    DistillConfig: ("teacher", "distill", "lm_teacher", "lm_student", "lm_on_policy", "diffusion_teacher", "diffusion_student",
                    "student", "icd_student", "moe_teacher", "dense_teacher"),
    GenerateTeacherDataConfig: ("generate_teacher_data", "lm_generate", "generate", "trajectories"),
    SelectConfig: ("select", "lm_select"),
    CascadeConfig: ("cascade", "lm_cascade"),
    EvaluateConfig: ("evaluate", "lm_evaluate", "diffusion_evaluate"),
}  # fmt: skip
BY_SECTION = {name: cls for cls, names in SECTION_CLASSES.items() for name in names}


def _sections(node):
    """(section name, mapping) of every stage section in a params or bench file, nested ones included."""
    for key, value in node.items():
        if not isinstance(value, dict):
            continue
        if key in BY_SECTION:
            yield key, value
        elif key == "overrides":  # bench: per method, on top of `student`
            yield from (("student", v) for v in value.values())
        else:
            yield from _sections(value)


def test_values_in_params_bench_files_and_tiny_params_lie_in_their_ranges():
    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert set(params) <= set(BY_SECTION), set(params) - set(BY_SECTION)
    files = [params, TINY, *(yaml.safe_load(p.read_text()) for p in sorted((root / "bench").glob("*.yaml")))]
    seen = 0
    for loaded in files:
        for name, section in _sections(loaded):
            cls = BY_SECTION[name]
            known = {f.name for f in dataclasses.fields(cls)}
            from_dict(cls, {k: v for k, v in section.items() if k in known}, name)  # the bench keeps a few keys of its own
            seen += 1
    assert seen >= 30


def test_out_of_range_settings_through_the_cli(cli, tiny_run, tmp_path):
    out = tmp_path / "o"
    cli.fails("evaluate", "--model", tiny_run["teacher"], "--data", tiny_run["tdata"], "--out", out, "--set", "bins=0",
              match="params evaluate.bins must be >= 1, got 0")  # fmt: skip
    cli.fails("distill", "--method", "ce", "--data", "digits", "--out", out, "--set", "lr=0",
              match="params distill.lr must be > 0, got 0.0")  # fmt: skip
    cli.fails("distill", "--method", "ce", "--data", "digits", "--out", out, "--set", "data.dev_frac=1",
              match="params data.dev_frac must be in [0, 1), got 1.0")  # fmt: skip
    cli.fails("generate-teacher-data", "--teacher", tiny_run["teacher"], "--data", "digits", "--out", out, "--set", "shard_rows=0",
              match="params generate_teacher_data.shard_rows must be >= 1, got 0")  # fmt: skip
    cli.fails("cascade", "--student", tiny_run["teacher"], "--teacher", tiny_run["teacher"], "--data", tiny_run["tdata"],
              "--out", out, "--set", "confidence=1.5", match="params cascade.confidence must be in [0, 1], got 1.5")  # fmt: skip
    cli.fails("select", tiny_run["tdata"], "--out", out, "--set", "threshold=-0.1",
              match="params select.threshold must be in [0, 1], got -0.1")  # fmt: skip
    _assert_nothing_written(out)


# ---- an --out that cannot be written ------------------------------------------------------


def _every_command(tiny_run, out):
    t = tiny_run
    return {
        "generate-teacher-data": ("generate-teacher-data", "--teacher", t["teacher"], "--data", "digits", "--out", out, "-q"),
        "select": ("select", t["tdata"], "--out", out, "-q"),
        "distill": ("distill", "--method", "kd", "--data", t["selected"], "--out", out, "-q"),
        "cascade": ("cascade", "--student", t["teacher"], "--teacher", t["teacher"], "--data", t["tdata"], "--out", out, "-q"),
        "evaluate": ("evaluate", "--model", t["teacher"], "--data", t["tdata"], "--out", out, "-q"),
    }


@pytest.mark.parametrize("command", ["generate-teacher-data", "select", "distill", "cascade", "evaluate"])
def test_out_under_a_regular_file_is_one_line(cli, tiny_run, tmp_path, command):
    blocker = tmp_path / "a_file"  # a parent that is a file: not writable through, for root too
    blocker.write_text("not a folder\n")
    out = blocker / "sub" / "o"
    cli.fails(
        *_every_command(tiny_run, out)[command], match=f"cannot write --out {out}: Not a directory; choose a writable location"
    )
    assert blocker.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "params.yaml"]


@pytest.mark.parametrize("command", ["select", "evaluate"])
def test_out_in_a_read_only_folder_is_one_line(cli, tiny_run, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes into read-only folders anyway (root)")
        out = locked / "o"
        cli.fails(*_every_command(tiny_run, out)[command], match=f"cannot write --out {out}: Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_permission_error_anywhere_is_one_line_and_exit_2():
    with pytest.raises(typer.Exit) as exc:
        with handled():
            raise PermissionError(13, "Permission denied", "/some/input.csv")
    assert exc.value.exit_code == 2


# ---- user tables with a single class ---------------------------------------------------------


@pytest.mark.parametrize("label,shown", [("1", "1"), ("cat", "'cat'")])
def test_user_table_with_a_single_class_is_refused(cli, tmp_path, label, shown):
    csv = tmp_path / "one.csv"
    csv.write_text("a,b,target\n" + "".join(f"{i},{2 * i},{label}\n" for i in range(12)))
    out = tmp_path / "o"
    cli.fails("distill", "--method", "ce", "--data", csv, "--label", "target", "--out", out,
              match=f"label column 'target' holds a single class ({shown})")  # fmt: skip
    _assert_nothing_written(out)
