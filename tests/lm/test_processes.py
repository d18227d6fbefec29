"""Several processes (torchrun, gloo on CPU): generate-teacher-data shards its parts by
process and merges them into the table one process writes; a resumed run must have as
many processes as the killed one."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.loopback import free_port

LM = ["--set", "data.sizes=[120,20,20]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip
GEN = ["--data", "basic_arithmetic", "--set", "data.sizes=[120,20,20]", "--set", "samples=2", "--set", "temperature=1.0",
       "--set", "top_k=4", "--set", "max_new_tokens=4", "--set", "shard_prompts=16", "-q"]  # fmt: skip


def torchrun(n: int, *args, params) -> subprocess.CompletedProcess:
    from conftest import REPO_ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(free_port()),
           "-m", "distilcli", *[str(a) for a in args], "--params", str(params)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("procs")
    Cli(write_params(root)).ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "t", "--set", "epochs=2", *LM)
    return root / "t"


def test_two_processes_write_the_table_one_process_writes(teacher, tmp_path):
    from conftest import Cli, write_params

    params = write_params(tmp_path)
    Cli(params).ok("generate-teacher-data", "--teacher", teacher, "--out", tmp_path / "one", *GEN)
    done = torchrun(2, "generate-teacher-data", "--teacher", teacher, "--out", tmp_path / "two", *GEN, params=params)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = pq.read_table(tmp_path / "one").to_pylist(), pq.read_table(tmp_path / "two").to_pylist()
    key = lambda r: (r["id"], r["completion"], tuple(r["token_ids"]), tuple(r["topk_ids"]))  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two)) and len(two) == len({r["id"] for r in two})
    assert [r["id"] for r in one] == [r["id"] for r in two]  # merged in the order one process writes
    assert not list((tmp_path / "two").glob("rank-*")) and not (tmp_path / "two.partial").exists()


def test_a_resume_needs_as_many_processes_as_the_killed_run(teacher, tmp_path):
    from conftest import Cli, dies_on_call, write_params

    from stages.artifacts import TableWriter

    params = write_params(tmp_path)
    with dies_on_call(TableWriter, "write", 2, after=True):
        killed = Cli(params)("generate-teacher-data", "--teacher", teacher, "--out", tmp_path / "td", *GEN)
    assert killed.exit_code == 130 and (tmp_path / "td.partial").exists()
    rerun = torchrun(2, "generate-teacher-data", "--teacher", teacher, "--out", tmp_path / "td", *GEN, params=params)
    # each process exits 2 with the one line (torchrun itself then exits 1 and prints its own report)
    assert rerun.returncode != 0 and "resume with as many" in rerun.stderr and "exitcode  : 2" in rerun.stderr
    assert "[rank0]:" not in rerun.stderr  # no traceback from a process
    Cli(params).ok("generate-teacher-data", "--teacher", teacher, "--out", tmp_path / "td", *GEN)  # one process resumes it


def test_two_processes_train_the_loss_curve_of_one_at_the_same_global_batch(tmp_path):
    import json

    from conftest import Cli, write_params

    params = write_params(tmp_path)
    args = ["distill", "--method", "sft", "--data", "basic_arithmetic", "--set", "epochs=3", *LM]
    Cli(params).ok(*args, "--out", tmp_path / "one")
    two = torchrun(2, *args, "--out", tmp_path / "two", params=params)
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "training.json").read_text())["history"]
    h2 = json.loads((tmp_path / "two" / "training.json").read_text())["history"]
    assert len(h1) == len(h2) == 3
    for a, b in zip(h1, h2, strict=True):  # per-process token means averaged by DDP vs one global token mean
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=0.05)
    assert h2[-1]["dev_loss"] < h2[0]["dev_loss"]
    bad = torchrun(2, *args, "--out", tmp_path / "odd", "--set", "batch_size=15", params=params)
    assert bad.returncode != 0 and "does not split over 2 processes" in bad.stderr and "exitcode  : 2" in bad.stderr
    assert not (tmp_path / "odd").exists() and not (tmp_path / "odd.partial").exists()
