"""Every long-running stage survives a kill at any point: SIGKILL at seeded random moments
inside its work, rerun the same command, and the output equals an uninterrupted run's
(no lost, duplicated or corrupt row; identical weights; dvclive steps 0, 1, 2, ...).

One kill point per stage by default; ``pytest --fault-points 20`` (or
``DISTIL_FAULT_POINTS=20``) for the full sweep, ``DISTIL_FAULT_SEED`` for other draws.
Ctrl-C and SIGTERM stop a real ``python -m distilcli`` with one line and a resumable partial.
"""

from __future__ import annotations

import os
import signal
import string
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import write_params
from faults import (
    Child,
    Diff,
    Timed,
    compare_files,
    compare_json,
    compare_logs,
    compare_tables,
    compare_tensors,
    diffusion_rows,
    kill_delays,
    kill_once,
    leftovers,
    manifest_rows,
    partial_of,
    run_to_end,
    table_rows,
    wait_for,
)

SECTIONS = {
    "data": {"sizes": [40, 10, 10], "task_options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
    "generate_teacher_data": {"shard_rows": 10},
    "distill": {"epochs": 30},
    "lm_teacher": {"method": "sft", "lm": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 320}, "epochs": 2,
                   "batch_size": 16, "lr": 0.01},
    "lm_generate": {"samples": 2, "temperature": 1.0, "top_k": 8, "max_new_tokens": 6, "shard_prompts": 6},
    "lm_select": {"by": "majority"},
    "lm_student": {"method": "kd", "lm": {"hidden": 32, "layers": 1, "heads": 2, "vocab_size": 320}, "epochs": 12,
                   "batch_size": 16, "lr": 0.01},
    "lm_cascade": {"policy": "sc-cascade", "samples": 2, "max_new_tokens": 4, "temperature": 1.0, "batch_size": 64},
    "diffusion_teacher": {"method": "denoise", "diffusion": {"width": 16, "depth": 1, "checkpoint_every": 2}, "steps": 20,
                          "batch_size": 64, "lr": 0.003},
    "diffusion_student": {"method": "consistency-distill", "steps": 40, "batch_size": 64, "lr": 0.003,
                          "diffusion": {"width": 16, "depth": 1, "skip": 100, "eval_samples": 32, "checkpoint_every": 2}},
    "diffusion_generate": {"steps": 4, "noise_samples": 48, "shard_samples": 4, "save_every": 2, "batch_size": 4},
}  # fmt: skip
"""Tiny params: each stage's work takes a second or two, over many shards and checkpoints."""

SETUP = {
    "lm_teacher": ["distill", "--section", "lm_teacher", "--data", "chain_sum"],
    "diffusion_teacher": ["distill", "--section", "diffusion_teacher", "--data", "moons"],
}
"""Inputs of the stages under test, built once and never killed."""


@dataclass(frozen=True)
class Stage:
    """A command under test (``{name}`` placeholders: another stage's or SETUP's output) and
    what its output holds: a table keyed by ``keys`` (at ``table`` inside it), a trained model
    (tensors and dvclive logs), JSON files to compare."""

    name: str
    argv: list[str]
    keys: list[str] = field(default_factory=list)
    table: str = "."
    model: bool = False
    json: list[str] = field(default_factory=list)

    def check(self, out: Path, ref: Path) -> Diff:
        diff = Diff(leftovers=leftovers(out))
        if diff.leftovers:
            return diff
        compare_files(out, ref, diff)
        if self.keys:
            rows = diffusion_rows if "sample" in self.keys else table_rows
            compare_tables(rows(out / self.table), rows(ref / self.table), self.keys, diff)
            if manifest_rows(out / self.table) != manifest_rows(ref / self.table):
                diff.other.append("manifest row count differs")
        if self.model:
            compare_tensors(out, ref, diff)
            compare_logs(out, ref, diff)
        compare_json(out, ref, self.json, diff)
        return diff


STAGES = [
    Stage("gtd_classifier", ["generate-teacher-data", "--teacher", "{teacher}", "--data", "digits"], keys=["id"]),
    Stage("select_classifier", ["select", "{gtd_classifier}"], keys=["id"]),
    Stage("distill_classifier", ["distill", "--data", "{select_classifier}"], model=True, json=["training.json"]),
    Stage("cascade_classifier", ["cascade", "--student", "{distill_classifier}", "--teacher", "{teacher}", "--data",
                                 "{gtd_classifier}"], keys=["id"], table="decisions", json=["metrics.json", "policy.json"]),
    Stage("evaluate_classifier", ["evaluate", "--model", "{distill_classifier}", "--model", "{teacher}", "--data", "digits"],
          json=["metrics.json"]),
    Stage("gtd_lm", ["generate-teacher-data", "--section", "lm_generate", "--teacher", "{lm_teacher}", "--data", "chain_sum"],
          keys=["id"]),
    Stage("select_lm", ["select", "{gtd_lm}", "--section", "lm_select"], keys=["id"]),
    Stage("distill_lm", ["distill", "--section", "lm_student", "--data", "{select_lm}"], model=True, json=["training.json"]),
    Stage("cascade_lm", ["cascade", "--section", "lm_cascade", "--student", "{distill_lm}", "--teacher", "{lm_teacher}",
                         "--data", "{gtd_lm}"], keys=["id"], table="decisions", json=["metrics.json", "policy.json"]),
    Stage("gtd_diffusion", ["generate-teacher-data", "--section", "diffusion_generate", "--teacher", "{diffusion_teacher}",
                            "--data", "moons"], keys=["sample", "step"]),
    Stage("distill_diffusion", ["distill", "--section", "diffusion_student", "--teacher", "{diffusion_teacher}", "--data",
                                "moons"], model=True, json=["training.json"]),
]  # fmt: skip
BY_NAME = {s.name: s for s in STAGES}


class Pipeline:
    """The stages' uninterrupted runs, each built (with what it reads) the first time asked."""

    def __init__(self, root: Path, inputs: dict[str, Path]):
        self.root = root
        self.params = write_params(root, **SECTIONS)
        self.paths: dict[str, Path] = dict(inputs)
        self.timed: dict[str, Timed] = {}

    def argv(self, name: str, out: Path) -> list[str]:
        template = BY_NAME[name].argv if name in BY_NAME else SETUP[name]
        deps = {f for a in template for _, f, _, _ in string.Formatter().parse(a) if f}
        paths = {d: self.reference(d).out if d not in self.paths else self.paths[d] for d in deps}
        return [a.format(**paths) for a in template] + ["--out", str(out), "--params", str(self.params), "-q"]

    def reference(self, name: str) -> Timed:
        if name not in self.timed:
            out = self.root / name
            self.timed[name] = run_to_end(self.argv(name, out), out, self.root / f"{name}.log")
            self.paths[name] = out
        return self.timed[name]


@pytest.fixture(scope="session")
def pipeline(tiny_run, tmp_path_factory) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("faults"), {"teacher": tiny_run["teacher"]})


@pytest.fixture(scope="session")
def fault_points(request) -> int:
    return int(request.config.getoption("--fault-points") or os.environ.get("DISTIL_FAULT_POINTS") or 1)


@pytest.mark.parametrize("name", [s.name for s in STAGES])
def test_a_killed_stage_reruns_to_the_uninterrupted_result(name, pipeline, fault_points, tmp_path):
    stage, ref = BY_NAME[name], pipeline.reference(name)
    delays = kill_delays(name, fault_points, ref.work_s, seed=int(os.environ.get("DISTIL_FAULT_SEED", "0")))
    total, failures, late = Diff(), [], 0
    for i, delay in enumerate(delays):
        out = tmp_path / f"point{i}" / "out"
        out.parent.mkdir()
        argv = pipeline.argv(name, out)
        kill = kill_once(argv, out, out.parent / "killed.log", delay)
        assert kill.landed and kill.rc == -signal.SIGKILL, f"point {i}: rc {kill.rc}\n{kill.output[-2000:]}"
        late += kill.tries
        rerun = Child(argv, out.parent / "rerun.log")
        assert rerun.wait() == 0, f"point {i} (kill at +{kill.delay:.3f} s): the rerun failed\n{rerun.output()[-3000:]}"
        diff = stage.check(out, ref.out)
        for k in ("rows", "lost", "duplicated", "corrupt"):
            setattr(total, k, getattr(total, k) + getattr(diff, k))
        if not diff.clean:
            failures.append(f"point {i} (kill at +{kill.delay:.3f} s of {ref.work_s:.2f} s): {diff}")
    print(f"\nfaults {name}: {len(delays) - len(failures)}/{len(delays)} kill points survived over {ref.work_s:.2f} s of work; "
          f"rows compared {total.rows}, lost {total.lost}, duplicated {total.duplicated}, corrupt {total.corrupt}; "
          f"{'weights and dvclive steps compared' if stage.model else 'no model'}; {late} draws came after the work ended, redrawn")  # fmt: skip
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_with_one_line_and_a_partial_that_a_rerun_completes(sig, pipeline, tmp_path):
    """A real ``python -m distilcli distill``, signalled once its first checkpoint exists."""
    ref = pipeline.reference("distill_classifier")
    out = tmp_path / "out"
    argv = pipeline.argv("distill_classifier", out)
    child = Child(argv, tmp_path / "signalled.log", exec_=True)
    assert wait_for(partial_of(out) / "checkpoint" / "main" / "state.json", child) is not None, child.output()
    child.signal(sig)
    rc, lines = child.wait(), [line for line in child.output().splitlines() if line.strip()]
    assert rc == 128 + sig, (rc, lines)
    assert len(lines) == 1 and "interrupted" in lines[0] and "rerun" in lines[0], lines
    assert not out.exists() and (partial_of(out) / "checkpoint").exists()
    rerun = Child(argv, tmp_path / "rerun.log")
    assert rerun.wait() == 0, rerun.output()[-3000:]
    diff = BY_NAME["distill_classifier"].check(out, ref.out)
    assert diff.clean, diff


# ---- kill points the random sweep reaches only now and then, pinned ---------------------------


class Killed(BaseException):
    pass


def test_a_checkpoint_cut_between_its_two_files_loads_whole_from_the_newer_one(tmp_path):
    """save_state writes tensors, then the JSON skeleton: a kill between them once paired the
    new weights with the old epoch counter, and the resumed run trained an epoch twice."""
    import torch
    from conftest import dies_on_call

    import stages.artifacts.store as store

    store.save_state(tmp_path / "state", {"w": torch.zeros(3), "progress": {"epoch": 1}})
    with dies_on_call(store, "write_json", 1, Killed, after=False), pytest.raises(Killed):
        store.save_state(tmp_path / "state", {"w": torch.ones(3), "progress": {"epoch": 2}})
    saved = store.load_state(tmp_path / "state")
    assert saved["progress"]["epoch"] == 2 and torch.equal(saved["w"], torch.ones(3))


def test_a_resumed_partial_drops_the_temp_files_of_writes_a_kill_cut_short(tmp_path):
    from stages.artifacts import Output

    work = Output(tmp_path / "out", "fp").open()
    (work / "dvclive").mkdir()
    for name in ("part-00000.parquet", ".part-00001.parquet.tmp-123", "dvclive/.loss.tsv.tmp-7", ".manifest.json.tmp-5"):
        (work / name).write_text("x")
    Output(tmp_path / "out", "fp").open()
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()) == [".fingerprint", "part-00000.parquet"]


def test_a_dvclive_summary_or_row_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    """dvclive rewrites metrics.json and appends rows in place: a kill can leave an empty
    summary (dvclive then failed to resume) or half a row (the rewind failed to parse it)."""
    from stages.runlog import logged

    (tmp_path / "checkpoint").mkdir()
    metrics = tmp_path / "dvclive" / "plots" / "metrics"
    metrics.mkdir(parents=True)
    (tmp_path / "dvclive" / "metrics.json").write_text("")
    (metrics / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t0\t0.5\n2\t1\t0.4\n17000")
    with logged(tmp_path, progress=False) as (series, _):
        series.rewind(1)
    assert (metrics / "loss.tsv").read_text().splitlines() == ["timestamp\tstep\tloss", "1\t0\t0.5"]
