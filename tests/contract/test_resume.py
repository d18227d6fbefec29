"""A killed stage is rerun and finishes without duplicates or loss."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import dies_on_call

from stages import distill, generate_teacher_data
from stages.artifacts import TableWriter, load_tensors
from stages.config import DataConfig, DistillConfig, GenerateTeacherDataConfig, ModelConfig


class Killed(Exception):
    pass


def test_teacher_data_resumes_after_a_kill(tiny_run, tmp_path):
    cfg = GenerateTeacherDataConfig(shard_rows=20)
    data_cfg = DataConfig(dev_frac=0.2, test_frac=0.2, limit=60)
    with dies_on_call(TableWriter, "write", 4, Killed, after=False), pytest.raises(Killed):
        generate_teacher_data.run(cfg, tiny_run["teacher"], "digits", tmp_path / "td", data_cfg=data_cfg, progress=False)
    assert not (tmp_path / "td").exists()
    assert len(list((tmp_path / "td.partial").glob("part-*.parquet"))) == 3
    generate_teacher_data.run(cfg, tiny_run["teacher"], "digits", tmp_path / "td", data_cfg=data_cfg, progress=False)
    generate_teacher_data.run(cfg, tiny_run["teacher"], "digits", tmp_path / "ref", data_cfg=data_cfg, progress=False)
    resumed, ref = pq.read_table(tmp_path / "td"), pq.read_table(tmp_path / "ref")
    ids = resumed.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 180
    assert resumed.equals(ref)


def test_distill_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(tiny_run, tmp_path):
    cfg = DistillConfig(method="kd", model=ModelConfig(arch="mlp", width=8, depth=1), epochs=4, batch_size=16)
    data_cfg = DataConfig(dev_frac=0.2, test_frac=0.2, limit=60)
    distill.run(cfg, tiny_run["selected"], tmp_path / "ref", data_cfg=data_cfg, progress=False)

    import stages.classifier.training as mod

    with dies_on_call(mod, "save_state", 2, Killed), pytest.raises(Killed):
        distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)
    assert not (tmp_path / "s").exists() and (tmp_path / "s.partial" / "checkpoint").exists()
    distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)

    import json

    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    a, b = load_tensors(tmp_path / "s" / "model.safetensors"), load_tensors(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    assert not (tmp_path / "s" / "checkpoint").exists()


@pytest.mark.parametrize("kill_at", [2, 5])
def test_multi_round_method_resumes_finished_rounds_and_the_open_one(tiny_run, tmp_path, kill_at):
    """self-distill trains one model per round; a kill in round 2 keeps round 1 and resumes round 2."""
    cfg = DistillConfig(method="self-distill", model=ModelConfig(arch="mlp", width=8, depth=1), epochs=3, batch_size=16,
                        generations=2, gt_weight=0.5)  # fmt: skip
    data_cfg = DataConfig(dev_frac=0.2, test_frac=0.2, limit=60)
    distill.run(cfg, tiny_run["selected"], tmp_path / "ref", data_cfg=data_cfg, progress=False)

    import stages.classifier.training as mod

    with dies_on_call(mod, "save_state", kill_at, Killed), pytest.raises(Killed):
        distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)
    distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)
    for rel in ("model.safetensors", "generations/g1/model.safetensors"):
        a, b = load_tensors(tmp_path / "s" / rel), load_tensors(tmp_path / "ref" / rel)
        for k in a:
            assert (a[k] - b[k]).abs().max() < 1e-6, (rel, k)


def test_a_really_killed_cli_run_resumes(tiny_run, tmp_path):
    """SIGKILL a `distil distill` process mid-training, rerun it: it resumes and completes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import write_params

    params = write_params(tmp_path)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "distilcli", "distill", "--method", "kd", "--data", str(tiny_run["selected"]),
           "--out", str(out), "--params", str(params), "--set", "epochs=400", "-q"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out.with_name("s.partial") / "checkpoint" / "main" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text() or "{}")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and state.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((out / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 401))
    assert not out.with_name("s.partial").exists()


def _series(run) -> dict[str, list[tuple[int, float]]]:
    """A finished run's dvclive metric histories: ``{metric: [(step, value), ...]}``."""
    import csv

    root = run / "dvclive" / "plots" / "metrics"
    series = {}
    for tsv in sorted(root.rglob("*.tsv")):
        with open(tsv, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        series[tsv.relative_to(root).with_suffix("").as_posix()] = [(int(r["step"]), float(r[tsv.stem])) for r in rows]
    return series


def _assert_same_series(resumed, ref, steps: int, tol: float) -> None:
    """The resumed run's dvclive series count steps 0..steps-1 once each, like the
    uninterrupted run's, with the same values; its summary ends at the last step."""
    import json

    got, want = _series(resumed), _series(ref)
    assert got.keys() == want.keys() and got
    assert sorted({s for rows in got.values() for s, _ in rows}) == list(range(steps))
    for name in want:
        assert [s for s, _ in got[name]] == [s for s, _ in want[name]], name
        assert max(abs(a - b) for (_, a), (_, b) in zip(got[name], want[name], strict=True)) <= tol, name
    assert json.loads((resumed / "dvclive" / "metrics.json").read_text())["step"] == steps - 1


@pytest.mark.parametrize(
    ("method", "kill_at", "after", "steps"),
    [
        ("kd", 1, True, 3),  # killed once epoch 1 is checkpointed: dvclive itself resumed at step 0 again
        ("kd", 2, False, 3),  # epoch 2 logged but not checkpointed: it is trained and logged again
        ("self-distill", 5, False, 9),  # 3 rounds of 3 epochs: round 2's epoch 2 logged, not checkpointed
    ],
)
def test_classifier_dvclive_steps_continue_after_a_resume(tiny_run, tmp_path, method, kill_at, after, steps):
    cfg = DistillConfig(method=method, model=ModelConfig(arch="mlp", width=8, depth=1), epochs=3, batch_size=16,
                        generations=2, gt_weight=0.5)  # fmt: skip
    data_cfg = DataConfig(dev_frac=0.2, test_frac=0.2, limit=60)
    distill.run(cfg, tiny_run["selected"], tmp_path / "ref", data_cfg=data_cfg, progress=False)

    import stages.classifier.training as mod

    with dies_on_call(mod, "save_state", kill_at, Killed, after=after), pytest.raises(Killed):
        distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)
    distill.run(cfg, tiny_run["selected"], tmp_path / "s", data_cfg=data_cfg, progress=False)
    _assert_same_series(tmp_path / "s", tmp_path / "ref", steps, tol=1e-6)


def test_lm_dvclive_steps_continue_after_a_resume(tmp_path):
    """Epoch 2 is logged, then the run dies before checkpointing it."""
    import stages.lm.training as mod
    from stages.config import LMConfig

    cfg = DistillConfig(method="sft", epochs=3, batch_size=16, lr=0.01, lm=LMConfig(hidden=16, layers=1, heads=2, vocab_size=320))
    data_cfg = DataConfig(sizes=[40, 8, 8])
    distill.run(cfg, "basic_arithmetic", tmp_path / "ref", data_cfg=data_cfg, progress=False)
    with dies_on_call(mod, "save_state", 2, Killed, after=False), pytest.raises(Killed):
        distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    _assert_same_series(tmp_path / "s", tmp_path / "ref", 3, tol=1e-4)


def test_diffusion_dvclive_steps_continue_after_a_resume_between_checkpoints(tmp_path):
    """Checkpoints every 2 epochs; killed as epoch 6 starts, the run resumes from epoch 4 and
    trains epoch 5 again: it is logged once."""
    import stages.diffusion.training as mod
    from stages.config import DiffusionConfig

    cfg = DistillConfig(method="denoise", diffusion=DiffusionConfig(width=16, depth=1, checkpoint_every=2), steps=32,
                        batch_size=50, lr=0.003)  # fmt: skip
    data_cfg = DataConfig(sizes=[200, 20, 20])
    distill.run(cfg, "moons", tmp_path / "ref", data_cfg=data_cfg, progress=False)
    with dies_on_call(mod, "_train_epoch", 6, Killed, after=False), pytest.raises(Killed):
        distill.run(cfg, "moons", tmp_path / "s", data_cfg=data_cfg, progress=False)
    assert len(_series(tmp_path / "s.partial")["loss"]) == 5
    distill.run(cfg, "moons", tmp_path / "s", data_cfg=data_cfg, progress=False)
    _assert_same_series(tmp_path / "s", tmp_path / "ref", 8, tol=0.0)
