"""`distil evaluate` below the CLI: `stages.evaluate.run` on the session's tiny teacher and
a tiny student, checked against a recomputation from each model's own predictions; and the
summary table of `stages.report`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, Cli, write_params
from rich.console import Console

from stages import evaluate as evaluate_stage
from stages.artifacts import MANIFEST, join_timing
from stages.classifier.models import load_classifier, param_count
from stages.config import DataConfig, EvaluateConfig
from stages.errors import DistilError
from stages.metrics import ece, softmax
from stages.report import summary_table, write_summary

DATA = DataConfig(**TINY["data"])


@pytest.fixture(scope="module")
def models(tiny_run, tmp_path_factory):
    """The session's teacher and a kd student of its selection."""
    root = tmp_path_factory.mktemp("eval")
    student = root / "student"
    Cli(write_params(root)).ok("distill", "--data", tiny_run["selected"], "--out", student, "-q")
    return {"teacher": tiny_run["teacher"], "student": student, "tdata": tiny_run["tdata"]}


@pytest.fixture(scope="module")
def evaluated(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "metrics"
    path = evaluate_stage.run(EvaluateConfig(bins=10), [models["teacher"], models["student"]], models["tdata"], out,
                              data_cfg=DATA, device="cpu", console=Console(file=io.StringIO()))  # fmt: skip
    return path


def _split(tdata, split):
    table = pq.read_table(tdata)
    table = table.filter(np.asarray(table.column("split").to_pylist()) == split)
    x = np.asarray(table.column("features").to_pylist(), np.float32)
    y = np.asarray(table.column("label").to_pylist())
    teacher = np.asarray(table.column("logits").to_pylist(), np.float32).argmax(1)
    return x, y, teacher


def _own_predictions(model_dir, x):
    model, _ = load_classifier(model_dir, "cpu")
    with torch.no_grad():
        return softmax(model(torch.from_numpy(x)).float().numpy())


def test_evaluate_writes_metrics_for_each_model(evaluated):
    assert evaluated.name == "metrics" and not evaluated.with_name("metrics.partial").exists()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student"}
    manifest = json.loads((evaluated / MANIFEST).read_text())
    assert manifest["kind"] == "evaluation" and join_timing(manifest)["metrics"] == metrics  # timings sit under "timing"
    assert manifest["params"]["evaluate"]["bins"] == 10 and manifest["params"]["evaluate"]["split"] == "test"


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_metrics_match_a_recomputation_from_the_models_predictions(models, evaluated, name):
    m = json.loads((evaluated / "metrics.json").read_text())[name]
    x, y, teacher_pred = _split(models["tdata"], "test")
    probs = _own_predictions(models[name], x)
    pred = probs.argmax(1)
    assert m["rows"] == len(y) == 60
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-9)
    assert m["agreement_with_teacher"] == pytest.approx(float((pred == teacher_pred).mean()), abs=1e-9)
    assert m["ece"] == pytest.approx(ece(probs, y, 10), abs=1e-6)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()
    assert m["nll"] == pytest.approx(float(nll), rel=1e-4)
    model, _ = load_classifier(models[name], "cpu")
    assert m["params"] == param_count(model)
    assert m["rows_per_second"] > 0 and m["ms_per_1k_rows"] > 0


def test_the_teacher_agrees_with_its_own_teacher_data(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["teacher"]["agreement_with_teacher"] == 1.0


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_plots_hold_each_models_test_predictions(models, evaluated, name):
    x, y, _ = _split(models["tdata"], "test")
    pred = _own_predictions(models[name], x).argmax(1)
    with open(evaluated / "plots" / name / "confusion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["actual"]) for r in rows] == y.tolist()
    assert [int(r["predicted"]) for r in rows] == pred.tolist()
    with open(evaluated / "plots" / name / "reliability.csv") as fh:
        bins = list(csv.DictReader(fh))
    assert sum(int(b["count"]) for b in bins) == 60 and all(int(b["count"]) > 0 for b in bins)


def test_summary_lists_each_model(evaluated):
    text = (evaluated / "summary.txt").read_text().split("paired:")[0]  # the models' table; the pairs' follows
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert "distil: models on the test split" in text
    rows = {cells[0]: cells for line in text.splitlines() if (cells := [c.strip() for c in line.split("│")[1:-1]])}
    assert set(rows) == set(metrics)
    for name, m in metrics.items():
        assert rows[name][1:4] == [f"{m['accuracy']:.4f}", f"{m['ece']:.4f}", f"{m['params']:,}"]


def test_paired_comparison_of_the_two_models_on_the_same_rows(models, evaluated):
    x, y, _ = _split(models["tdata"], "test")
    right = {n: _own_predictions(models[n], x).argmax(1) == y for n in ("teacher", "student")}
    (pair,) = json.loads((evaluated / "paired.json").read_text())
    assert (pair["a"], pair["b"], pair["items"]) == ("teacher", "student", len(y))
    assert pair["diff"] == pytest.approx(right["teacher"].mean() - right["student"].mean())
    assert pair["mcnemar"]["a_only"] == int((right["teacher"] & ~right["student"]).sum())
    assert pair["mcnemar"]["b_only"] == int((right["student"] & ~right["teacher"]).sum())
    lo, hi = pair["interval"]
    assert lo <= pair["diff"] <= hi and pair["excludes_zero"] == (lo > 0 or hi < 0)
    text = (evaluated / "summary.txt").read_text()
    assert text.index("distil: models on the test split") < text.index("paired: accuracy difference A - B")


def test_another_split_is_evaluated_on_its_rows(models, tmp_path):
    out = evaluate_stage.run(EvaluateConfig(split="dev"), [models["student"]], models["tdata"], tmp_path / "ev",
                             data_cfg=DATA, device="cpu", console=Console(file=io.StringIO()))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())["student"]
    x, y, _ = _split(models["tdata"], "dev")
    pred = _own_predictions(models["student"], x).argmax(1)
    assert m["rows"] == 60 and m["accuracy"] == pytest.approx(float((pred == y).mean()))


def test_a_bad_split_raises_and_writes_nothing(models, tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(DistilError, match="has no rows in split 'validation'; set evaluate.split to train, dev or test"):
        evaluate_stage.run(EvaluateConfig(split="validation"), [models["teacher"]], models["tdata"], out, data_cfg=DATA,
                           device="cpu", console=Console(file=io.StringIO()))  # fmt: skip
    assert not out.exists() and not (tmp_path / "ev.partial").exists()


def test_duplicate_model_names_raise_and_write_nothing(models, tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(DistilError, match="model names must be unique"):
        evaluate_stage.run(EvaluateConfig(), [models["teacher"], models["teacher"]], models["tdata"], out, data_cfg=DATA,
                           device="cpu", console=Console(file=io.StringIO()))  # fmt: skip
    assert not out.exists() and not (tmp_path / "ev.partial").exists()


def test_a_generator_only_setting_is_refused_for_classifiers(models, tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(DistilError, match="setting 'n_samples' is for diffusion evaluations, not classifier evaluations"):
        evaluate_stage.run(EvaluateConfig(n_samples=10), [models["teacher"]], models["tdata"], out, data_cfg=DATA)
    assert not out.exists()


def test_evaluating_on_raw_digits_has_no_teacher_agreement(models, tmp_path):
    out = evaluate_stage.run(EvaluateConfig(), [models["teacher"]], "digits", tmp_path / "ev", data_cfg=DATA,
                             device="cpu", console=Console(file=io.StringIO()))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())["teacher"]
    assert "agreement_with_teacher" not in m and m["rows"] == 60


# ---- stages.report -----------------------------------------------------------------------


def _cells(table):
    columns = [list(c.cells) for c in table.columns]
    return [list(row) for row in zip(*columns, strict=True)]


def test_summary_table_rows():
    results = {
        "teacher": {"accuracy": 0.91234, "ece": 0.05, "params": 12345, "ms_per_1k_rows": 1.234},
        "casc": {"accuracy": 0.9, "ms_per_1k_rows": 0.5, "teacher_rate": 0.25},
    }
    table = summary_table(results)
    assert table.title == "distil: models on the test split"
    assert [c.header for c in table.columns] == ["model", "accuracy", "ECE", "params", "ms / 1k rows", "teacher rate"]
    assert table.row_count == 2
    assert _cells(table) == [
        ["teacher", "0.9123", "0.0500", "12,345", "1.23", "-"],
        ["casc", "0.9000", "-", "-", "0.50", "25.0%"],
    ]


def test_summary_table_empty():
    assert summary_table({}).row_count == 0


def test_write_summary_writes_and_prints_the_same_table(tmp_path):
    results = {"m": {"accuracy": 0.5, "ms_per_1k_rows": 2.0}}
    buf = io.StringIO()
    write_summary(tmp_path, results, Console(file=buf, width=100))
    text = (tmp_path / "summary.txt").read_text()
    assert "0.5000" in text and " m " in text
    assert "0.5000" in buf.getvalue()
