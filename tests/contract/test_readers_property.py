"""Property: every table reader and validator, and the config builder, either returns or
raises ``DistilError``, whatever it is fed; never another exception (which the CLI would
show as a traceback).

Fed: random user tables (CSV or Parquet; random column names, types, NaN/inf, nulls,
repeats, no rows) to the user-table reader; tables near each distil schema (columns
dropped, retyped, emptied, poisoned) to the teacher-data, selection, examples and prompt
readers; random prompt files (JSONL, CSV, Parquet) to the prompt-table reader; random
params mappings and ``--set`` strings to ``from_dict`` / ``load_section``. A last property
draws any numeric setting with a declared range, in any params section that holds it, and
a value outside that range: refused in one line naming the setting's full dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import tempfile
from pathlib import Path
from typing import get_type_hints

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stages.artifacts import (
    CLASSIFIER_TEACHER_DATA,
    DIFFUSION_TEACHER_DATA,
    EXAMPLES,
    LM_SELECTION,
    LM_TEACHER_DATA,
    MANIFEST,
    SELECTION,
    Kind,
    inspect_table,
    iter_batches,
    list_column_to_numpy,
    read_any_table,
    read_table,
)
from stages.config import (
    CascadeConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    GenerateTeacherDataConfig,
    SelectConfig,
    from_dict,
    load_section,
    parse_overrides,
)
from stages.errors import DistilError
from stages.tasks import load_examples, load_prompts
from stages.tasks.reasoning import PROMPTS, load_prompt_table

PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
STAGE_CONFIGS = (DataConfig, GenerateTeacherDataConfig, SelectConfig, DistillConfig, CascadeConfig, EvaluateConfig)


def distil_error_or_nothing(fn, *args, **kwargs):
    """Call ``fn``; a DistilError is a fine answer (one line, no newline), anything else fails."""
    name = getattr(fn, "__name__", "reader")
    try:
        got = fn(*args, **kwargs)
    except DistilError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        event(f"{name}: refused")  # --hypothesis-show-statistics: how often each reader accepts
        return None
    event(f"{name}: accepted")
    return got


# ---- random columns --------------------------------------------------------------------------

FINITE = st.floats(-1e6, 1e6, width=32)
POISON = st.sampled_from([float("nan"), float("inf"), float("-inf")])
WORDS = st.text(string.ascii_letters + string.digits + " ,;\"'\n-_.", max_size=8)
NAMES = st.one_of(st.sampled_from(["label", "split", "id", "features", "logits", "prompt", "answer", "a", "b"]), WORDS)
SPLIT_WORDS = st.sampled_from(["train", "train", "dev", "test"])


def _values(draw, clean, dirty, n: int, nulls: bool, poisoned: bool) -> list:
    """``n`` values of ``clean``; with ``nulls`` / ``poisoned`` a few are None / drawn from ``dirty``."""
    values = draw(st.lists(clean, min_size=n, max_size=n))
    for flag, bad in ((nulls, st.none()), (poisoned, dirty)):
        if flag and n:
            for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2)):
                values[i] = draw(bad)
    return values


def _column(kind: str, n: int, draw, dirt: str = "clean") -> pa.Array:
    """``n`` values of one kind: clean, with a few nulls, or with a few bad values (NaN and
    inf for floats, ragged rows for lists, odd words for splits, big or negative ints)."""
    nulls, poisoned = dirt == "nulls", dirt == "poisoned"
    if kind == "int":
        return pa.array(_values(draw, st.integers(0, 50), st.integers(-(2**40), 2**40), n, nulls, poisoned), pa.int64())
    if kind == "small_int":
        return pa.array(_values(draw, st.integers(0, 2), st.integers(-2, 9), n, nulls, poisoned), pa.int64())
    if kind == "float":
        return pa.array(_values(draw, FINITE, POISON, n, nulls, poisoned), pa.float64())
    if kind == "str":
        return pa.array(_values(draw, SPLIT_WORDS | WORDS.filter(str.strip), WORDS, n, nulls, poisoned), pa.string())
    if kind == "split":
        return pa.array(_values(draw, SPLIT_WORDS, WORDS, n, nulls, poisoned), pa.string())
    if kind == "bool":
        return pa.array(_values(draw, st.booleans(), st.booleans(), n, nulls, False), pa.bool_())
    if kind == "null":
        return pa.nulls(n)
    width = draw(st.integers(1, 3))
    if kind == "float_list":
        ragged = st.lists(FINITE, max_size=width + 1).map(lambda r: [*r, float("nan")])
        rows = _values(draw, st.lists(FINITE, min_size=width, max_size=width), ragged, n, nulls, poisoned)
        return pa.array(rows, pa.list_(pa.float32()))
    if kind == "int_list":
        rows = _values(draw, st.lists(st.integers(0, 250), max_size=4), st.lists(st.integers(-3, 2**20), max_size=4), n, nulls,
                       poisoned)  # fmt: skip
        return pa.array(rows, pa.list_(pa.int32()))
    return pa.array(
        _values(draw, st.lists(WORDS, max_size=2), st.lists(WORDS, max_size=2), n, nulls, False), pa.list_(pa.string())
    )


KINDS = ["int", "small_int", "float", "str", "split", "bool", "null", "float_list", "int_list", "str_list"]
DIRT = st.sampled_from(["clean", "clean", "clean", "nulls", "poisoned"])


@st.composite
def random_tables(draw) -> pa.Table:
    """Anything: random names (repeats possible) and kinds."""
    n = draw(st.integers(0, 8))
    names = draw(st.lists(NAMES, max_size=5))
    return pa.Table.from_arrays([_column(draw(st.sampled_from(KINDS)), n, draw, draw(DIRT)) for _ in names], names=names)


def _of(field: pa.Field) -> str:
    t = field.type
    if field.name == "split":
        return "split"
    if pa.types.is_list(t):
        inner = t.value_type
        return "float_list" if pa.types.is_floating(inner) else "int_list" if pa.types.is_integer(inner) else "str_list"
    if pa.types.is_integer(t):
        return "small_int" if field.name == "label" else "int"
    return "float" if pa.types.is_floating(t) else "str" if pa.types.is_string(t) else "bool"


@st.composite
def near(draw, schema: pa.Schema) -> pa.Table:
    """A table close to ``schema``: all its columns of their own kind, then up to two of them
    dirtied (nulls, bad values), retyped or dropped, and sometimes one extra column; 0 to 12 rows."""
    n = draw(st.integers(0, 12))
    spoilt = set(draw(st.lists(st.sampled_from(schema.names), max_size=2)))
    names, arrays = [], []
    for field in schema:
        fate = draw(st.sampled_from(["nulls", "poisoned", "retype", "drop"])) if field.name in spoilt else "clean"
        if fate != "drop":
            kind = draw(st.sampled_from(KINDS)) if fate == "retype" else _of(field)
            names.append(field.name)
            arrays.append(_column(kind, n, draw, "clean" if fate == "retype" else fate))
    if draw(st.integers(0, 3)) == 0:
        names.append(draw(NAMES))
        arrays.append(_column(draw(st.sampled_from(KINDS)), n, draw, draw(DIRT)))
    return pa.Table.from_arrays(arrays, names=names)


USER_TABLE = pa.schema([("a", pa.float64()), ("b", pa.int64()), ("label", pa.int64())])
"""The shape of a user table that loads: numeric features and a small integer label."""


def _write(table: pa.Table, path: Path, fmt: str) -> Path:
    if fmt == "csv":
        try:
            pacsv.write_csv(table, path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # lists have no CSV form: drop them
            keep = [i for i, f in enumerate(table.schema) if not pa.types.is_list(f.type)]
            pacsv.write_csv(table.select(keep), path)
    else:
        pq.write_table(table, path)
    return path


MANIFESTS = st.sampled_from(["none", "garbage", "list", "no_task", "task"])


def _distil_table(table: pa.Table, folder: Path, manifest: str, kind: str, parts: int) -> Path:
    """``table`` as a distil table folder of ``parts`` parts and the chosen kind of manifest."""
    folder.mkdir()
    step = max(1, math.ceil(table.num_rows / parts))
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")
    task = {"name": "t", "num_classes": 3, "input_shape": [2], "class_names": []}
    text = {"none": None, "garbage": "{not json", "list": "[1, 2]", "no_task": json.dumps({"kind": kind}),
            "task": json.dumps({"kind": kind, "task": task})}[manifest]  # fmt: skip
    if text is not None:
        (folder / MANIFEST).write_text(text)
    return folder


# ---- the readers -------------------------------------------------------------------------------


USER_TABLES = random_tables() | near(USER_TABLE) | near(USER_TABLE.append(pa.field("split", pa.string())))


@PROPERTY
@given(table=USER_TABLES, fmt=st.sampled_from(["csv", "parquet"]), label=st.sampled_from(["label", "label", "b"]) | NAMES,
       split=st.sampled_from(["", "", "split"]) | NAMES, features=st.sampled_from([[], [], ["a"], ["a", "b"], ["nope"]]),
       limit=st.integers(0, 3), long_tail=st.sampled_from([0.0, 0.0, 2.0]))  # fmt: skip
def test_user_tables_load_or_refuse_in_one_line(table, fmt, label, split, features, limit, long_tail):
    data = DataConfig(label=label, split_column=split, features=features, limit=limit, long_tail=long_tail, dev_frac=0.3)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(table, Path(tmp) / f"user.{fmt}", fmt)
        distil_error_or_nothing(read_any_table, path)
        ex = distil_error_or_nothing(load_examples, path, data)
    if ex is not None:  # what loads is canonical: every row has a split, a class in range and finite features
        labels = ex.table.column("label").to_numpy()
        assert ex.table.num_rows > 0 and set(ex.table.column("split").to_pylist()) <= {"train", "dev", "test"}
        assert labels.min() >= 0 and labels.max() < ex.num_classes
        list_column_to_numpy(ex.table.column("features"), "features")


@PROPERTY
@given(bytes_=st.binary(max_size=64) | WORDS.map(str.encode), suffix=st.sampled_from([".csv", ".parquet", ".jsonl", ".json"]))
def test_arbitrary_bytes_are_read_or_refused_in_one_line(bytes_, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(bytes_)
        if suffix in (".csv", ".parquet"):
            distil_error_or_nothing(load_examples, path, DataConfig())
        distil_error_or_nothing(load_prompt_table, path)


SCHEMAS = {"teacher_data": (CLASSIFIER_TEACHER_DATA, Kind.TEACHER_DATA), "selection": (SELECTION, Kind.SELECTION),
           "examples": (EXAMPLES, Kind.TEACHER_DATA), "lm_teacher_data": (LM_TEACHER_DATA, Kind.LM_TEACHER_DATA),
           "lm_selection": (LM_SELECTION, Kind.LM_SELECTION), "prompts": (PROMPTS, Kind.LM_PROMPTS),
           "trajectories": (DIFFUSION_TEACHER_DATA, Kind.DIFFUSION_TEACHER_DATA)}  # fmt: skip


@PROPERTY
@given(data=st.data(), which=st.sampled_from(sorted(SCHEMAS)), manifest=MANIFESTS, parts=st.integers(1, 3))
def test_distil_tables_read_or_refuse_in_one_line(data, which, manifest, parts):
    """The readers every stage calls on teacher data, selections and prompt tables: the
    schema check, the validated cast, the streaming reader, the list-column decoder, and
    the task loaders on top of them."""
    schema, kind = SCHEMAS[which]
    table = data.draw(near(schema))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _distil_table(table, Path(tmp) / "t", manifest, kind, parts)
        distil_error_or_nothing(inspect_table, folder, schema, which)
        distil_error_or_nothing(lambda: sum(b.num_rows for b in iter_batches(folder, None, 4)))
        read = distil_error_or_nothing(read_table, folder, schema, which)
        if read is not None:
            got, _ = read
            assert got.schema.names[: len(schema)] == schema.names and got.num_rows > 0
            for field in schema:
                if pa.types.is_list(field.type) and pa.types.is_floating(field.type.value_type):
                    distil_error_or_nothing(list_column_to_numpy, got.column(field.name), field.name)
        if which in ("teacher_data", "selection", "examples"):
            distil_error_or_nothing(load_examples, folder, DataConfig(limit=data.draw(st.integers(0, 2))))
        if which == "prompts":
            distil_error_or_nothing(load_prompts, folder, DataConfig())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | WORDS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(WORDS, inner, max_size=2),
    max_leaves=4,
)


@PROPERTY
@given(fmt=st.sampled_from(["jsonl", "csv", "parquet"]), data=st.data())
def test_prompt_files_load_or_refuse_in_one_line(fmt, data):
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "jsonl":
            keys = st.sampled_from(["prompt", "answer", "split", "x"]) | WORDS
            rows = data.draw(st.lists(st.dictionaries(keys, JSON_VALUES, max_size=4), max_size=5))
            path = Path(tmp) / "p.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            path = _write(data.draw(near(PROMPTS.remove(0))), Path(tmp) / f"p.{fmt}", fmt)
        got = distil_error_or_nothing(load_prompt_table, path)
    if got is not None:
        assert got.num_rows > 0 and all(p.strip() for p in got.column("prompt").to_pylist())
        assert set(got.column("split").to_pylist()) <= {"train", "dev", "test"}


# ---- params ------------------------------------------------------------------------------------


def _keys(cls) -> list[str]:
    return sorted({f.name for f in dataclasses.fields(cls)} | {"model", "lm", "diffusion", "nope"})


PARAM_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.sampled_from(["1e-3", "a,b", "[1", "3,0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.integers(0, 2), inner, max_size=3),
    max_leaves=6,
)


def _plausible(hint):
    """Values of a setting's own type (numbers in and out of range), or, a third of the time, anything."""
    if dataclasses.is_dataclass(hint):
        return _sections(hint)
    origin = getattr(hint, "__origin__", None)
    own = {int: st.integers(-2, 100), float: st.floats(-2, 10) | st.sampled_from(["1e-3", "nan"]), bool: st.booleans(),
           str: st.sampled_from(["train", "auto", "", "kd", "mlp"]) | st.text(max_size=4),
           dict: st.dictionaries(WORDS, st.integers(0, 3), max_size=2)}.get(hint)  # fmt: skip
    if origin is list:
        own = st.lists(_plausible(hint.__args__[0]), max_size=3) | st.sampled_from(["train,dev", "20,4,4", "3,[", ""])
    return own | PARAM_VALUES if own is not None else PARAM_VALUES


def _sections(cls):
    hints = get_type_hints(cls)
    return st.fixed_dictionaries({}, optional={f.name: st.deferred(lambda h=hints[f.name]: _plausible(h))
                                               for f in dataclasses.fields(cls)})  # fmt: skip


@PROPERTY
@given(data=st.data(), cls=st.sampled_from(STAGE_CONFIGS))
def test_random_params_build_a_config_or_refuse_in_one_line(data, cls):
    junk = st.dictionaries(st.sampled_from(_keys(cls)) | st.integers(0, 3) | st.text(max_size=4), PARAM_VALUES, max_size=4)
    values = data.draw(_sections(cls) | junk)
    cfg = distil_error_or_nothing(from_dict, cls, values, "section")
    if cfg is not None:
        assert isinstance(cfg, cls)


SET_STRINGS = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["epochs", "lr", "model.width", "data.sizes", "splits", "by",
                        "lm", "model", "x.y", ""]) | st.text(max_size=5), st.text(max_size=6) | st.sampled_from(["[1", "{a:", "3", "!!x"]))  # fmt: skip


@PROPERTY
@given(sets=st.lists(SET_STRINGS | st.text(max_size=6), max_size=3), cls=st.sampled_from(STAGE_CONFIGS))
def test_random_set_options_build_a_config_or_refuse_in_one_line(sets, cls):
    overrides = distil_error_or_nothing(parse_overrides, sets)
    if overrides is not None:
        overrides.pop("data", None)  # the CLI sends data.KEY to the data section
        distil_error_or_nothing(load_section, cls, {}, "section", overrides)


def _ranged(cls, prefix: str = ""):
    """(dotted path within a section, field, its item type) of every ranged setting, nested ones included."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _ranged(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("valid") is not None:
            hint = hints[f.name]
            yield f"{prefix}{f.name}", f, hint.__args__[0] if getattr(hint, "__origin__", None) is list else hint, hint


RANGED = [(cls, *r) for cls in STAGE_CONFIGS for r in _ranged(cls)]


def _nest(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: _nest(rest, value) if rest else value}


@PROPERTY
@given(data=st.data(), which=st.sampled_from(range(len(RANGED))))
def test_any_value_outside_a_declared_range_is_refused_naming_the_setting(data, which):
    cls, path, f, item, hint = RANGED[which]
    valid = f.metadata["valid"]
    numbers = st.integers(-(10**12), 10**12) if item is int else st.floats(allow_nan=True, allow_infinity=True)
    value = data.draw(numbers.filter(lambda v: v not in valid), label="value")
    given_ = [value] if getattr(hint, "__origin__", None) is list else value
    with pytest.raises(DistilError) as exc:
        from_dict(cls, _nest(path, given_), "section")
    message = str(exc.value)
    assert message.startswith(f"params section.{path} must be ") and str(valid) in message and "\n" not in message, message
