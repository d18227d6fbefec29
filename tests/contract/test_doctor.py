"""`distil doctor PATH`: healthy artifacts pass with an ok line; every kind of damage (edited
bytes, a deleted or extra part, NaN / inf, a truncated tensor file, a killed run's partial, a
manifest that lies) is a line naming the damaged file, and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from distilcli.app import app
from stages.artifacts import DECISIONS, MANIFEST
from stages.doctor import tables


def doctor(path: Path) -> list[str]:
    """`distil doctor PATH` exits 2 without a traceback; its lines, each a finding with a repair."""
    result = CliRunner().invoke(app, ["doctor", str(path)])
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and all("; " in line for line in lines), result.output
    return lines


def finding(lines: list[str], where: Path, what: str) -> str:
    hits = [line for line in lines if line.startswith(f"{where}: ") and what in line]
    assert hits, f"no line for {where} with {what!r}:\n" + "\n".join(lines)
    return hits[0]


def healthy(path: Path) -> str:
    result = CliRunner().invoke(app, ["doctor", str(path)])
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"ok: {path}: "), line
    return line


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


@pytest.fixture
def tdata(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run["tdata"], tmp_path / "tdata"))


@pytest.fixture
def model(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run["teacher"], tmp_path / "teacher"))


@pytest.fixture(scope="module")
def cascade(tiny_run, tmp_path_factory) -> Path:
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("doctor_cascade")
    teacher = tiny_run["teacher"]
    Cli(write_params(root)).ok("cascade", "-s", teacher, "-t", teacher, "--data", tiny_run["tdata"], "--out", root / "c", "-q")
    return root / "c"


def test_healthy_tables_model_and_cascade_pass(tiny_run, cascade):
    for name in ("tdata", "selected"):
        line = healthy(tiny_run[name])
        m = manifest(tiny_run[name])
        assert f"{m['rows']} rows in {len(m['parts'])} part(s)" in line and "content hash matches" in line, line
    assert "model (classifier), 1 safetensors file(s) finite" in healthy(tiny_run["teacher"])
    assert f"{DECISIONS}: cascade_decisions (classifier)" in healthy(cascade)


def test_tables_are_streamed_never_read_whole(tiny_run, monkeypatch):
    def whole(*args, **kwargs):
        raise AssertionError("doctor read a whole table")

    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", whole)
    healthy(tiny_run["tdata"])


@pytest.mark.parametrize("where", ["footer", "page"])
def test_edited_parquet_bytes(tdata, where):
    part = tdata / "part-00002.parquet"
    data = bytearray(part.read_bytes())
    at = len(data) - 4 if where == "footer" else len(data) // 3  # the closing PAR1 magic, or inside a column chunk
    data[at : at + 4] = b"\xde\xad\xbe\xef"
    part.write_bytes(bytes(data))
    lines = doctor(tdata)
    finding(lines, tdata, "differ from the content hash")
    if where == "footer":
        finding(lines, part, "is not a readable Parquet file")


def test_deleted_and_extra_parts(tdata):
    rows = manifest(tdata)["rows"]
    gone, last = tdata / "part-00001.parquet", sorted(tdata.glob("part-*.parquet"))[-1]
    held = rows - pq.ParquetFile(gone).metadata.num_rows + pq.ParquetFile(last).metadata.num_rows
    assert held != rows  # the last part is the short one, so the count cannot come out even
    gone.unlink()
    shutil.copy(last, tdata / "part-00042.parquet")
    lines = doctor(tdata)
    finding(lines, gone, "listed in the manifest but missing")
    finding(lines, tdata / "part-00042.parquet", "a part the manifest does not list")
    finding(lines, tdata, f"the manifest says {rows} rows but the parts hold {held}")


def test_nan_and_inf_injected_into_a_part(tdata):
    part = tdata / "part-00003.parquet"
    table = pq.read_table(part)
    logits = table.column("logits").to_pylist()
    logits[0][1], logits[-1][0] = float("nan"), float("-inf")
    i = table.schema.get_field_index("logits")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(logits, table.schema.field(i).type)), part)
    lines = doctor(tdata)
    line = finding(lines, part, "column 'logits' holds 2 NaN/inf value(s)")
    assert line.endswith(f"rerun the command that wrote it: {manifest(tdata)['command']}"), line


def test_a_part_without_a_column_of_its_kind(tdata):
    part = tdata / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["logits"]), part)
    finding(doctor(tdata), part, "has no column 'logits'")


def test_nonfinite_counts_span_batches_and_skip_nulls(tmp_path, monkeypatch):
    """float16 list values (LM top-k log-probs) and a nullable float column, over batches of 2 rows."""
    monkeypatch.setattr(tables, "BATCH_ROWS", 2)
    inf, nan = float("inf"), float("nan")
    lists = pa.array([[0.5, nan], None, [inf, -1.0], [0.0], [nan, nan]], pa.list_(pa.float16()))
    scores = pa.array([1.0, None, None, 0.0, inf], pa.float32())
    pq.write_table(pa.table({"topk_logprobs": lists, "score": scores}), tmp_path / "part-00000.parquet")
    rows, found = tables.check_table(tmp_path, {"rows": 5, "parts": ["part-00000.parquet"]}, None, "fix")
    assert rows == 5
    assert sorted(f.problem for f in found) == [
        "column 'score' holds 1 NaN/inf value(s) in the table",
        "column 'topk_logprobs' holds 4 NaN/inf value(s) in the table",
    ]


def test_truncated_tensor_file_and_nan_in_a_tensor(model, tmp_path):
    nan_model = Path(shutil.copytree(model, tmp_path / "nan_model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    finding(doctor(model), weights, "is not a readable safetensors file")
    tensors = load_file(nan_model / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key].view(-1)[:3] = float("nan")
    save_file(tensors, nan_model / "model.safetensors")
    finding(doctor(nan_model), nan_model / "model.safetensors", f"tensor '{key}' holds 3 NaN/inf value(s)")


def test_weights_edited_after_they_were_written(model):
    tensors = load_file(model / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] += 1.0  # still finite, still readable: only the content hash tells
    save_file(tensors, model / "model.safetensors")
    finding(doctor(model), model, "differ from the content hash")


def test_a_model_without_its_config(model):
    (model / "config.json").unlink()
    finding(doctor(model), model / "config.json", "is missing")


def test_a_cascade_without_its_policy(cascade, tmp_path):
    broken = Path(shutil.copytree(cascade, tmp_path / "c"))
    (broken / "policy.json").unlink()
    finding(doctor(broken), broken / "policy.json", "is missing")


def test_leftovers_of_a_killed_run(tdata):
    partial = tdata.with_name("tdata.partial")
    partial.mkdir()
    (partial / ".fingerprint").write_text("0123456789abcdef\n")
    old = tdata.with_name("tdata.old-4242")
    old.mkdir()
    lines = doctor(tdata)
    line = finding(lines, partial, "a killed run left this unfinished output of tdata")
    assert f"rerun the command that wrote it: {manifest(tdata)['command']}" in line and f"or delete {partial}" in line
    finding(lines, old, "an interrupted commit left")
    finding(doctor(partial), partial, "is the unfinished output of a killed run")
    assert (partial / ".fingerprint").read_text() == "0123456789abcdef\n" and old.is_dir()  # doctor only reads


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m | {"rows": m["rows"] + 1}, "the manifest says"),
        (lambda m: m | {"content_hash": "0" * 64}, "differ from the content hash"),
    ],
    ids=["rows", "hash"],
)
def test_a_manifest_that_disagrees_with_the_files(tdata, edit, what):
    (tdata / MANIFEST).write_text(json.dumps(edit(manifest(tdata))))
    (line,) = doctor(tdata)
    assert line.startswith(f"{tdata}: ") and what in line, line


@pytest.mark.parametrize(
    "damage, where, what",
    [
        (lambda d: (d / MANIFEST).unlink(), "", f"has no {MANIFEST}"),
        (lambda d: (d / MANIFEST).write_text("{not json"), MANIFEST, "is not valid JSON"),
        (lambda d: (d / MANIFEST).write_text(json.dumps(manifest(d) | {"kind": "weights"})), MANIFEST, "unknown kind 'weights'"),
        (lambda d: (d / MANIFEST).write_text(json.dumps(manifest(d) | {"schema_version": 99})), MANIFEST, "schema_version 99"),
        (lambda d: shutil.rmtree(d), "", "does not exist"),
    ],
    ids=["no-manifest", "bad-json", "unknown-kind", "schema-version", "missing-path"],
)
def test_unreadable_or_absent_artifacts_are_one_line(tdata, damage, where, what):
    damage(tdata)
    (line,) = doctor(tdata)
    assert line.startswith(f"{tdata / where if where else tdata}: ") and what in line, line
