"""pipelines/smollm2 (the real-model pipeline) is wired like the default one: every stage runs
a real command whose params section exists and validates for language models, its deps exist
or are produced, its code deps are those of the matching default LM stage (so an edit reruns
the same stages in both), and `make smollm2` runs it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from distilcli.app import app

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "pipelines" / "smollm2"
DVC = yaml.safe_load((HERE / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((HERE / "params.yaml").read_text())
DEFAULT = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
TWIN = {"teacher_data": "lm_generate", "sft": "lm_kd", "kd": "lm_kd", "on_policy": "lm_on_policy", "evaluate": "lm_evaluate"}
"""Each stage's counterpart in the default pipeline (same command and modality)."""


def _argv(stage: str) -> list[str]:
    cmd = DVC["stages"][stage]["cmd"]
    for name, value in {k: v for d in DVC.get("vars", []) for k, v in d.items()}.items():
        cmd = cmd.replace("${" + name + "}", str(value))
    cmd = re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(PARAMS[m.group(1)][m.group(2)]), cmd)
    return shlex.split(cmd)


def _paths(entries):
    for e in entries or []:
        yield from (e if isinstance(e, dict) else {e: None}).keys()


def test_every_stage_has_a_twin():
    assert set(DVC["stages"]) == set(TWIN)


@pytest.mark.parametrize("stage", sorted(TWIN))
def test_stage_command_params_and_paths(stage):
    from stages.config import (
        CascadeConfig,
        DistillConfig,
        EvaluateConfig,
        GenerateTeacherDataConfig,
        check_modality,
        load_section,
        parse_overrides,
    )

    spec, argv = DVC["stages"][stage], _argv(stage)
    assert argv[0] == "distil" and argv[1] in {c.name for c in app.registered_commands}
    section = argv[argv.index("--section") + 1]
    assert section in PARAMS and section in spec["params"] and set(spec["params"]) <= set(PARAMS)
    classes = {"distill": DistillConfig, "evaluate": EvaluateConfig, "cascade": CascadeConfig,
               "generate-teacher-data": GenerateTeacherDataConfig}  # fmt: skip
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    check_modality(load_section(classes[argv[1]], PARAMS, section, parse_overrides(sets)), "lm")
    produced = {o for s in DVC["stages"].values() for key in ("outs", "metrics") for o in _paths(s.get(key))}
    for dep in spec["deps"]:
        assert (HERE / dep).resolve().exists() or dep in produced, f"{stage}: dep {dep} neither exists nor is produced"
    code = {d.removeprefix("../../") for d in spec["deps"] if d.startswith("../../")}
    assert code == {d for d in DEFAULT[TWIN[stage]]["deps"] if d.startswith("stages/")}, f"{stage} vs {TWIN[stage]}"
    for out in _paths(spec.get("outs")):
        assert out in argv or any(out.startswith(a + "/") for a in argv), f"{stage}: out {out} not named in the cmd"


def test_the_student_is_four_times_smaller_and_the_data_large_enough():
    """The issue's floor: >= 1,000 train instructions, a student of >= 4x fewer non-embedding parameters."""
    from stages.tasks.mixture import task_names

    tasks = task_names(_argv("teacher_data")[_argv("teacher_data").index("--data") + 1])
    assert len(tasks) * PARAMS["data"]["sizes"][0] >= 1000
    kept = PARAMS["student"]["lm"]["keep_layers"]
    assert 30 / len(kept) >= 4  # SmolLM2-135M: 30 identical decoder layers, embeddings tied


def test_make_runs_the_pipeline_in_its_folder():
    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("\nsmollm2:") :].split("\n\n")[0]
    assert "cd pipelines/smollm2" in recipe and "dvc repro" in recipe and "metrics/summary.txt" in recipe
