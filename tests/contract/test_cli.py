"""Every command through CliRunner: help, version, and all five chained on tiny data."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stages.artifacts import MANIFEST

COMMANDS = ["generate-teacher-data", "select", "distill", "cascade", "evaluate"]


def test_top_level_help_lists_every_command(cli):
    out = cli.ok("--help").output
    for cmd in COMMANDS:
        assert cmd in out


def test_version(cli):
    assert cli.ok("--version").output.strip().startswith("distil ")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help_has_shared_options_and_an_example(cli, cmd):
    out = cli.ok(cmd, "--help").output
    for opt in ("--out", "--params", "--set", "--seed"):
        assert opt in out, opt
    assert "Example" in out and f"distil {cmd}" in out


def test_distill_help_lists_methods(cli):
    from stages.lm.methods import LM_METHODS

    out = cli.ok("distill", "--help").output
    for m in ("ce", "kd", "reverse-kl", "jsd", "skew-kl", "tvd"):
        assert f"{m}" in out
    flat = " ".join(out.replace("│", " ").split())
    for name, method in LM_METHODS.items():  # each language-model method by its description, not its dataclass
        assert f"{name}: {' '.join(method.help.split()[:6])}" in flat
    assert "LMMethod(" not in out


def test_chain_of_all_five_commands(cli, tmp_path):
    d = {k: tmp_path / k for k in ("teacher", "tdata", "sel", "student", "casc", "ev")}
    cli.ok("distill", "--section", "teacher", "--data", "digits", "--out", d["teacher"], "-q")
    cli.ok("generate-teacher-data", "--teacher", d["teacher"], "--data", "digits", "--out", d["tdata"], "-q")
    cli.ok("select", d["tdata"], "--by", "confident", "--out", d["sel"], "-q")
    cli.ok("distill", "--method", "jsd", "--data", d["sel"], "--out", d["student"], "--set", "beta=0.3", "--seed", "3", "-q")
    cli.ok("cascade", "--student", d["student"], "--teacher", d["teacher"], "--data", d["tdata"], "--out", d["casc"])
    result = cli.ok(
        "evaluate",
        "--model",
        d["teacher"],
        "--model",
        d["student"],
        "--cascade",
        d["casc"],
        "--data",
        d["tdata"],
        "--out",
        d["ev"],
    )

    # teacher data: one row per example of the limited splits, logits for 10 classes, readable by plain pyarrow
    table = pq.read_table(d["tdata"])
    assert table.num_rows == 3 * 60
    assert set(table.column("split").to_pylist()) == {"train", "dev", "test"}
    assert len(table.column("logits")[0]) == 10
    assert len(list(d["tdata"].glob("part-*.parquet"))) == 8  # 180 rows in parts of 25
    manifest = json.loads((d["tdata"] / MANIFEST).read_text())
    assert manifest["rows"] == 180 and manifest["kind"] == "teacher_data"
    assert manifest["model"]["sha256"] and manifest["params"]["generate_teacher_data"]["shard_rows"] == 25

    # the student records its resolved params, and the --set / --seed overrides took effect
    student_manifest = json.loads((d["student"] / MANIFEST).read_text())
    assert student_manifest["params"]["distill"]["beta"] == 0.3
    assert student_manifest["params"]["distill"]["seed"] == 3
    assert student_manifest["params"]["distill"]["method"] == "jsd"

    metrics = json.loads((d["ev"] / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student", "casc"}
    for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "nll", "agreement_with_teacher", "params", "rows_per_second"):
        assert m in metrics["teacher"], m
    assert metrics["teacher"]["agreement_with_teacher"] == 1.0  # the teacher data came from this teacher
    assert 0 <= metrics["casc"]["teacher_rate"] <= 1
    assert (d["ev"] / "plots" / "student" / "confusion.csv").exists()
    assert "teacher" in result.output and "accuracy" in result.output  # the rich summary table


def test_user_csv_table_trains_end_to_end(cli, tmp_path):
    from sklearn.datasets import load_iris

    iris = load_iris()
    names = ["setosa", "versicolor", "virginica"]
    path = tmp_path / "iris.csv"
    lines = [",".join([*(n.replace(" (cm)", "").replace(" ", "_") for n in iris.feature_names), "species"])]
    lines += [",".join([*map(str, row), names[t]]) for row, t in zip(iris.data, iris.target, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    cli.ok("distill", "--method", "ce", "--data", path, "--label", "species", "--out", tmp_path / "t", "--set", "epochs=3", "-q")
    cli.ok(
        "generate-teacher-data", "--teacher", tmp_path / "t", "--data", path, "--label", "species", "--out", tmp_path / "td", "-q"
    )
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["class_names"] == ["setosa", "versicolor", "virginica"] and config["input_shape"] == [4]
    assert pq.read_table(tmp_path / "td").num_rows == 60 + 30 + 30  # 150 rows, 60/20/20, train capped by data.limit


def test_shell_completion_completes_subcommands():
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("distil", path=str(Path(sys.executable).parent)) or shutil.which("distil")
    assert exe, "the distil console script is installed"
    env = {**os.environ, "_DISTIL_COMPLETE": "complete_bash", "COMP_WORDS": "distil gen", "COMP_CWORD": "1"}
    out = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60).stdout
    assert out.split() == ["generate-teacher-data"]


def test_training_in_a_git_repository_without_commits(cli, tmp_path, monkeypatch):
    """`make demo` from a tarball runs `git init` without a commit; dvclive asks git for HEAD even
    when it records no experiment, which failed there with a traceback."""
    import subprocess

    repo = tmp_path / "fresh"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".dvc").mkdir()  # a DVC project too, as after `dvc init`
    monkeypatch.chdir(repo)
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", "student")
    assert (repo / "student" / "dvclive" / "metrics.json").exists()
