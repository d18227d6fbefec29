"""DVC experiments see distil's numbers: on the repo's own dvc.yaml and .gitignore, a
`dvc exp run -S distill.method=jsd` (README's example) shows up in `dvc exp show`, `dvc metrics diff`, `dvc params diff` and
`dvc plots diff` with the values that changed.

Metrics and plots declared `cache: false` are read from git at each revision, so they must
be git-tracked. The pipeline is the whole default one on tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stages.artifacts import MANIFEST, is_timing

ROOT = Path(__file__).resolve().parents[2]
METRICS = "metrics/metrics.json"
EXP = "jsd"


@pytest.fixture(scope="module")
def experiment(dvc_pipeline):
    """The repo's pipeline reproduced on tiny settings (conftest ``dvc_pipeline``), committed as
    the baseline, then README's experiment: the students distilled with jsd instead of kd."""
    repo, run = dvc_pipeline
    dvc = (sys.executable, "-m", "dvc")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run(*dvc, "exp", "run", "-q", "-n", EXP, "-S", "distill.method=jsd")
    return repo, run, dvc


def _content(model_metrics: dict) -> dict:
    """A model's metrics without the wall-clock ones, which differ on every run."""
    return {k: v for k, v in model_metrics.items() if not is_timing(k)}


def _student_changed(old: dict, new: dict) -> bool:
    return any(abs(new["student"][k] - old["student"][k]) > 1e-6 for k in ("accuracy", "nll", "ece"))


def test_metrics_and_plots_files_are_committed_with_the_lock(experiment):
    repo, run, _ = experiment
    tracked = set(run("git", "ls-files", "metrics", "dvc.lock").split())
    assert {METRICS, "metrics/summary.txt", "metrics/plots/student/reliability.csv", "dvc.lock"} <= tracked
    assert not any(p.startswith(("models/", "data/", "cascade/")) for p in run("git", "ls-files").split())
    manifest = json.loads((repo / "models" / "student" / MANIFEST).read_text())
    assert manifest["params"]["distill"]["method"] == "jsd"  # the workspace holds the experiment's outputs


def test_exp_show_has_the_baseline_and_the_experiment_with_their_metrics(experiment):
    _, run, dvc = experiment
    rows = json.loads(run(*dvc, "exp", "show", "--json"))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    [exp] = [rev for group in baseline["experiments"] for rev in group["revs"] if rev["name"] == EXP]
    methods, metrics = [], []
    for row in (baseline, exp):
        data = row["data"]
        assert "error" not in data["metrics"][METRICS], data["metrics"][METRICS]
        metrics.append(data["metrics"][METRICS]["data"])
        methods.append(data["params"]["params.yaml"]["data"]["distill"]["method"])
    assert methods == ["kd", "jsd"]
    for unchanged in ("teacher", "student_ce"):
        assert _content(metrics[0][unchanged]) == _content(metrics[1][unchanged]), unchanged
    assert _student_changed(metrics[0], metrics[1]), metrics


def test_metrics_diff_shows_the_changed_values(experiment):
    _, run, dvc = experiment
    for revs in ((), ("HEAD", EXP)):  # HEAD against the workspace (the experiment's results), and the experiment itself
        diff = json.loads(run(*dvc, "metrics", "diff", *revs, "--json"))[METRICS]
        diff = {k: d for k, d in diff.items() if not is_timing(k.rsplit(".", 1)[-1])}
        assert diff and all(k.startswith(("student.", "cascade.")) for k in diff), diff  # only what changed is listed
        for k, d in diff.items():
            assert d["old"] is not None and d["new"] is not None, (k, d)
            assert abs(d["diff"] - (d["new"] - d["old"])) < 1e-9


def test_params_diff_shows_the_changed_param(experiment):
    _, run, dvc = experiment
    diff = json.loads(run(*dvc, "params", "diff", "HEAD", EXP, "--json"))
    assert diff == {"params.yaml": {"distill.method": {"old": "kd", "new": "jsd"}}}


def test_plots_diff_draws_both_revisions_with_the_new_numbers(experiment):
    _, run, dvc = experiment
    out = json.loads(run(*dvc, "plots", "diff", "HEAD", EXP, "--json"))
    classifier = ("metrics/", "models/student", "cascade/")
    errors = [e for e in out.get("errors", []) if e.get("source", "").startswith(classifier)]
    assert not errors, errors
    for title in ("Reliability diagram (test split)", "Student dev accuracy per epoch"):
        [plot] = out["data"][title]
        assert plot["revisions"] == ["HEAD", EXP], title
    [curve] = out["data"]["Student dev accuracy per epoch"]
    rows = [r for r in curve["content"]["data"]["values"] if r["filename"].startswith("student/")]
    # the student's dev curve comes from its cached model folder, at each revision
    assert {r["rev"] for r in rows} == {"HEAD", EXP}, rows
