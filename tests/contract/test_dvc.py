"""dvc.yaml is wired right: every stage names a real command, params section and paths;
and the default pipeline runs under `dvc repro` / `dvc exp run` on tiny settings."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from distilcli.app import app

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
COMMANDS = {c.name for c in app.registered_commands}


def _paths(entries):
    for e in entries or []:
        yield from (e if isinstance(e, dict) else {e: None}).keys()


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_command_params_and_paths_exist(name):
    stage = DVC["stages"][name]
    argv = shlex.split(stage["cmd"])
    assert argv[0] == "distil" and argv[1] in COMMANDS, stage["cmd"]
    section = argv[argv.index("--section") + 1] if "--section" in argv else argv[1].replace("-", "_")
    assert section in PARAMS, f"{name}: params section {section} missing"
    for p in stage.get("params", []):
        assert p in PARAMS, f"{name}: params {p} not in params.yaml"
    assert section in stage.get("params", []), f"{name}: cmd reads section {section} but does not declare it"
    produced = {o for s in DVC["stages"].values() for key in ("outs", "metrics", "plots") for o in _paths(s.get(key))}
    for dep in stage.get("deps", []):
        assert (ROOT / dep).exists() or dep in produced, f"{name}: dep {dep} neither exists nor is produced"
        if not dep.startswith("stages/"):
            assert dep in argv or any(a.endswith("=" + dep) for a in argv), f"{name}: data dep {dep} is not named in the cmd"
    for out in _paths(stage.get("outs")):
        assert out in argv or any(out.startswith(a + "/") for a in argv), f"{name}: out {out} not named in the cmd"


def test_dvc_config_disables_analytics():
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()


@pytest.fixture(scope="module")
def pipeline(dvc_pipeline):
    return dvc_pipeline


def test_dvc_repro_metrics_and_plots(pipeline):
    repo, run = pipeline
    metrics = json.loads((repo / "metrics" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student", "student_ce", "cascade"}
    lm = json.loads((repo / "metrics_lm" / "metrics.json").read_text())
    assert set(lm) == {"lm_teacher", "lm_sft_gold", "lm_sft_teacher", "lm_kd", "lm_on_policy"}
    cascade = json.loads((repo / "cascade_lm" / "metrics.json").read_text())
    assert cascade["policy"] == "sc-cascade" and cascade["queries"] == 8 and 0 <= cascade["teacher_rate"] <= 1
    assert (repo / "cascade_lm" / "summary.txt").read_text().startswith("LM cascade sc-cascade: accuracy")
    generators = json.loads((repo / "metrics_diffusion" / "metrics.json").read_text())
    assert {"diffusion_teacher/steps_1", "diffusion_student/steps_2", "floor"} <= set(generators)
    assert (repo / "metrics_diffusion" / "plots" / "samples.png").stat().st_size > 0
    shown = json.loads(run(sys.executable, "-m", "dvc", "metrics", "show", "--json"))
    assert "metrics/metrics.json" in json.dumps(shown)
    run(sys.executable, "-m", "dvc", "metrics", "diff")
    plots = json.loads(run(sys.executable, "-m", "dvc", "plots", "show", "--json"))
    names = list(plots["data"])
    for title in ("Reliability", "Cascade calibration", "dev accuracy per epoch", "confusion.csv"):
        assert any(title in k for k in names), names
    assert "distil: models" in (repo / "metrics" / "summary.txt").read_text()
    status = run(sys.executable, "-m", "dvc", "status")
    assert "up to date" in status.lower() or status.strip() == ""
