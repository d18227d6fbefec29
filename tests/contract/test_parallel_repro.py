"""``pipelines/repro.py`` (``make demo``'s runner): independent DVC stages at once, every stage
after the stages it depends on, the same ``dvc.lock`` and cache as one ``dvc repro``, and a
failure that stops what depends on it.

A tiny pipeline of shell-free Python commands that record when they ran: ``a`` and ``b`` are
independent (2 s each), ``c`` reads both, ``bad`` fails when the ``fail`` param is on and
``after`` depends on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from faults import ctrl_c_reaches_child

from tests.conftest import REPO_ROOT, repo_shell

RUNNER = REPO_ROOT / "pipelines" / "repro.py"
# a stage command: sleep, then write its (start, end) times and the inputs it read
STEP = (
    "import json,sys,time; t=time.time(); time.sleep(float(sys.argv[2])); "
    "json.dump({'start': t, 'end': time.time(), 'read': [open(p).read() for p in sys.argv[3:]]}, open(sys.argv[1], 'w'))"
)


def _stage(out: str, seconds: float, *deps: str) -> dict:
    cmd = " ".join([f'"{sys.executable}"', "-c", json.dumps(STEP), out, str(seconds), *deps])
    return {"cmd": cmd, "deps": list(deps), "outs": [out]}


@pytest.fixture()
def pipeline(tmp_path: Path):
    run = repo_shell(tmp_path, timeout=120)
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    fail = (
        f"\"{sys.executable}\" -c \"import sys,yaml; bad = yaml.safe_load(open('params.yaml'))['fail']; "
        f"sys.exit('error: fail is on' if bad else 0)\""
    )
    stages = {
        "a": _stage("a.json", 2), "b": _stage("b.json", 2), "c": _stage("c.json", 0, "a.json", "b.json"),
        "bad": {"cmd": f"{fail} && echo ok > bad.txt", "params": ["fail"], "outs": ["bad.txt"]},
        "after": _stage("after.json", 0, "bad.txt"),
    }  # fmt: skip
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "params.yaml").write_text("fail: 0\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    return tmp_path, run


def _runner(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=repo, capture_output=True, text=True, timeout=120)


def _times(repo: Path, name: str) -> dict:
    return json.loads((repo / f"{name}.json").read_text())


def test_independent_stages_overlap_and_dependents_wait(pipeline):
    repo, run = pipeline
    proc = _runner(repo, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b, c = (_times(repo, n) for n in "abc")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # a and b ran at the same time
    assert c["start"] >= max(a["end"], b["end"])  # c only after both
    assert [json.loads(t)["end"] for t in c["read"]] == [a["end"], b["end"]]  # and read what they wrote
    assert "5 stages in" in proc.stdout
    # the same record as one `dvc repro`: every stage locked, nothing left to run
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c", "bad", "after"}
    assert "up to date" in run(sys.executable, "-m", "dvc", "status")
    assert run(sys.executable, "-m", "dvc", "repro", "--dry").count("didn't change") == 5
    again = _runner(repo, "--jobs", "2")  # up to date: DVC skips every stage
    assert again.returncode == 0 and _times(repo, "a") == a


def test_one_job_runs_stages_one_after_another(pipeline):
    repo, _ = pipeline
    assert _runner(repo, "--jobs", "1").returncode == 0
    a, b = _times(repo, "a"), _times(repo, "b")
    assert a["end"] <= b["start"] or b["end"] <= a["start"]


def test_a_failed_stage_stops_its_dependents_and_shows_its_message(pipeline):
    repo, _ = pipeline
    (repo / "params.yaml").write_text("fail: 1\n")
    proc = _runner(repo, "--jobs", "2")
    assert proc.returncode != 0
    assert "stage 'bad' failed" in proc.stdout and "error: fail is on" in proc.stdout  # the command's own message
    assert not (repo / "after.json").exists() and not (repo / "bad.txt").exists()
    assert "after" in proc.stdout.split("not started after the failure:")[1]


def test_bad_jobs_is_one_line_and_exit_2(pipeline):
    repo, _ = pipeline
    proc = _runner(repo, "--jobs", "0")
    assert proc.returncode == 2 and "--jobs must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_stops_the_running_stages_and_a_rerun_finishes(pipeline):
    """SIGINT to the runner while ``a`` and ``b`` sleep: both are stopped, the runner exits 130
    with one line saying to rerun, and the rerun completes the pipeline."""
    import signal
    import time

    repo, run = pipeline
    slow = {"a": _stage("a.json", 30), "b": _stage("b.json", 30), "c": _stage("c.json", 0, "a.json", "b.json")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": slow}))
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--jobs", "2"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_reaches_child)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (repo / ".dvc" / "tmp" / "rwlock").exists():
        time.sleep(0.2)
    time.sleep(3)  # both stages' commands are running
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: rerun to finish" in out
    assert time.monotonic() - started < 25  # the sleeping stages were stopped, not waited for
    assert not (repo / "a.json").exists() and not (repo / "c.json").exists()
    quick = {"a": _stage("a.json", 0), "b": _stage("b.json", 0), "c": _stage("c.json", 0, "a.json", "b.json")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": quick}))
    again = _runner(repo, "--jobs", "2")
    assert again.returncode == 0 and (repo / "c.json").exists(), again.stdout + again.stderr
