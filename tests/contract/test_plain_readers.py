"""distil's artifacts open without distil, as README's "Artifacts" section promises: a table
directory in every plain Parquet reader it names (the hidden manifest is skipped by all of
them), and a classifier model folder with safetensors and json alone.

Each reader must see what distil's own reader sees: the same rows, columns and values."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from stages.artifacts import CLASSIFIER_TEACHER_DATA, MANIFEST, read_table


@pytest.fixture(scope="module")
def table(tiny_run):
    """distil's own view of a classifier teacher-data table of several parts."""
    path = tiny_run["tdata"]
    assert (path / MANIFEST).exists() and len(list(path.glob("part-*.parquet"))) > 1
    own, manifest = read_table(path, CLASSIFIER_TEACHER_DATA, "teacher data")
    assert own.num_rows == manifest["rows"] > 0
    return path, own


def _same(got: pa.Table, own: pa.Table) -> None:
    """Same columns and, matched by id, the same values as distil's reader."""
    assert got.num_rows == own.num_rows
    assert got.column_names == own.column_names
    order = pc.sort_indices(got, [("id", "ascending")])
    ref = own.take(pc.sort_indices(own, [("id", "ascending")]))
    for name in own.column_names:
        assert got.take(order).column(name).to_pylist() == ref.column(name).to_pylist(), name


def test_pyarrow_parquet_read_table_opens_the_directory(table):
    path, own = table
    _same(pq.read_table(path), own)


def test_pyarrow_dataset_opens_the_directory(table):
    path, own = table
    _same(ds.dataset(path).to_table(), own)


def test_datasets_load_dataset_parquet_data_dir(table, tmp_path):
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(table[0]), cache_dir=str(tmp_path / "hf"))
    assert list(loaded) == ["train"]  # one split of every part; the manifest is not a data file
    _same(loaded["train"].data.table, table[1])


def test_duckdb_read_parquet_glob(table):
    duckdb = pytest.importorskip("duckdb")
    path, own = table
    _same(pa.table(duckdb.sql(f"SELECT * FROM read_parquet('{path}/*.parquet')")), own)  # via the Arrow stream


def test_polars_scan_parquet_glob(table):
    pl = pytest.importorskip("polars")
    path, own = table
    _same(pl.scan_parquet(f"{path}/*.parquet").collect().to_arrow(), own)


def test_a_classifier_model_folder_loads_with_safetensors_and_json_alone(tiny_run):
    from safetensors.numpy import load_file

    from stages.classifier.models import load_classifier

    path = tiny_run["teacher"]
    weights = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    model, own_config = load_classifier(path)
    assert config == own_config
    state = model.state_dict()
    assert weights.keys() == state.keys()
    for k, v in state.items():
        assert (weights[k] == v.numpy()).all(), k
    # nothing pickled anywhere in the folder: every file is JSON, safetensors or dvclive's TSV
    assert {p.suffix for p in path.rglob("*") if p.is_file()} <= {".json", ".safetensors", ".tsv"}
