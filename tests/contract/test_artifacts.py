"""The artifact contract: round trips, atomic outputs, resumable partials, state without pickle."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.artifacts import (
    CLASSIFIER_TEACHER_DATA,
    EXAMPLES,
    MANIFEST,
    Output,
    TableWriter,
    check_schema,
    iter_batches,
    list_column_to_numpy,
    load_state,
    read_table,
    save_state,
    write_manifest,
)
from stages.errors import DistilError


def _rows(lo: int, hi: int) -> dict:
    return {
        "id": list(range(lo, hi)),
        "split": ["train"] * (hi - lo),
        "label": [i % 3 for i in range(lo, hi)],
        "features": [[float(i), 1.0] for i in range(lo, hi)],
    }


def test_table_round_trip_is_readable_without_distil(tmp_path):
    out = Output(tmp_path / "t", "fp")
    with out as work:
        w = TableWriter(work, EXAMPLES)
        w.write(_rows(0, 5))
        w.write(_rows(5, 8))
        write_manifest(work, kind="examples", params={"a": 1}, inputs={"x": "y"}, rows=w.done_rows)
        out.commit()
    final = tmp_path / "t"
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]
    plain = pq.read_table(final)  # the manifest's leading underscore keeps directory readers happy
    assert plain.num_rows == 8 and plain.column("id").to_pylist() == list(range(8))
    table, manifest = read_table(final, EXAMPLES, "table")
    assert manifest["rows"] == 8 and manifest["schema_version"] == 1 and manifest["content_hash"]
    assert manifest["params"] == {"a": 1} and "distil" in manifest["code_version"]
    assert [b.num_rows for b in iter_batches(final, ["id"], batch_size=3)] == [3, 2, 3]


def test_output_is_invisible_until_commit_and_replaces_the_old_artifact(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    out = Output(target, "fp")
    with out as work:
        (work / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # until commit the old artifact is intact
        out.commit()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not (tmp_path / "t.partial").exists()


def test_partial_resumes_with_same_fingerprint_and_restarts_otherwise(tmp_path):
    with Output(tmp_path / "t", "one") as work:
        TableWriter(work, EXAMPLES).write(_rows(0, 4))
    # killed before commit: the partial stays and a same-fingerprint rerun sees its rows
    with Output(tmp_path / "t", "one") as work:
        assert TableWriter(work, EXAMPLES).done_rows == 4
    with Output(tmp_path / "t", "two") as work:
        assert TableWriter(work, EXAMPLES).done_rows == 0


def test_bad_input_inside_output_leaves_nothing(tmp_path):
    with pytest.raises(DistilError):
        with Output(tmp_path / "t", "fp") as work:
            TableWriter(work, EXAMPLES).write(_rows(0, 4))
            raise DistilError("bad")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_interrupt_inside_output_keeps_the_partial(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Output(tmp_path / "t", "fp") as work:
            TableWriter(work, EXAMPLES).write(_rows(0, 4))
            raise KeyboardInterrupt
    assert (tmp_path / "t.partial" / "part-00000.parquet").exists()


def test_writer_leaves_no_temp_files(tmp_path):
    w = TableWriter(tmp_path, EXAMPLES)
    w.write(_rows(0, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]


def test_schema_check_accepts_castable_and_rejects_wrong_types():
    ok = pa.schema([("id", pa.int32()), ("split", pa.string()), ("label", pa.int16()), ("features", pa.list_(pa.float64()))])
    check_schema(ok, EXAMPLES, "t")
    bad = pa.schema([("id", pa.int64()), ("split", pa.string()), ("label", pa.float32()), ("features", pa.list_(pa.float32()))])
    with pytest.raises(DistilError, match="column 'label' has type float"):
        check_schema(bad, EXAMPLES, "t")
    with pytest.raises(DistilError, match="no column 'logits'"):
        check_schema(ok, CLASSIFIER_TEACHER_DATA, "t")


def test_list_column_validation():
    col = pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32()))
    arr = list_column_to_numpy(col, "x")
    assert arr.shape == (2, 2) and arr.flags.writeable
    with pytest.raises(DistilError, match="different lengths"):
        list_column_to_numpy(pa.array([[1.0], [1.0, 2.0]]), "x")
    with pytest.raises(DistilError, match="NaN or inf"):
        list_column_to_numpy(pa.array([[1.0, float("inf")]]), "x")


def test_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "progress": {"epoch": 3, "history": [{"a": 1.5}]},
        "rng": torch.get_rng_state(),
    }
    save_state(tmp_path / "state", state)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}
    back = load_state(tmp_path / "state")
    assert back["progress"] == {"epoch": 3, "history": [{"a": 1.5}]}
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["param_groups"][0]["lr"] == 0.1
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))


def test_manifest_records_inputs_and_params(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"")
    pq.write_table(pa.table(_rows(0, 2), schema=EXAMPLES), tmp_path / "part-00000.parquet")
    m = write_manifest(
        tmp_path, kind="k", params={"p": {"x": np.float32(1.5)}}, inputs={"data": "abc"}, rows=2, model={"sha256": "h"}
    )
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == m and on_disk["inputs"] == {"data": "abc"} and on_disk["model"] == {"sha256": "h"}
