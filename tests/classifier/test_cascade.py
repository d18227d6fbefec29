"""Cascade calibration and routing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from stages.classifier.cascade import calibrate


def test_calibrate_picks_the_lowest_threshold_that_meets_the_target():
    conf = np.array([0.99, 0.95, 0.9, 0.6, 0.5])
    labels = np.zeros(5, dtype=int)
    s_ans = np.array([0, 0, 1, 1, 0])  # the student is wrong on the rows at 0.9 and 0.6
    t_ans = np.zeros(5, dtype=int)  # the teacher is always right
    thr, curve = calibrate(conf, s_ans, t_ans, labels, target=1.0)
    assert thr == 0.95  # below 0.95 the wrong row at 0.9 would be answered by the student
    thr, _ = calibrate(conf, s_ans, t_ans, labels, target=0.8)
    assert thr == 0.9  # one mistake allowed
    thr, _ = calibrate(conf, s_ans, t_ans, labels, target=0.0)
    assert thr == 0.0  # everything to the student, whatever its confidence
    rates = [c["teacher_rate"] for c in curve]
    assert rates == sorted(rates, reverse=True) and rates[0] == 1.0 and rates[-1] == 0.0


def test_calibrate_defers_everything_when_the_target_is_out_of_reach():
    conf = np.array([0.9, 0.8])
    thr, _ = calibrate(conf, np.array([1, 1]), np.array([1, 0]), np.array([0, 0]), target=1.0)
    assert thr > 1.0


def test_cascade_cli_calibrates_then_reuses_the_policy(cli, tiny_run, tmp_path):
    t = tiny_run["teacher"]
    cli.ok("distill", "--method", "kd", "--data", tiny_run["selected"], "--out", tmp_path / "s", "-q")
    cli.ok("cascade", "--student", tmp_path / "s", "--teacher", t, "--data", tiny_run["tdata"], "--out", tmp_path / "c",
           "--set", "target_accuracy=0.0")  # fmt: skip
    policy = json.loads((tmp_path / "c" / "policy.json").read_text())
    decisions = pq.read_table(tmp_path / "c" / "decisions")
    # target 0: the student answers everything
    assert set(decisions.column("route").to_pylist()) == {"student"}
    assert policy["dev"]["teacher_rate"] == 0.0

    cli.ok("cascade", "--student", tmp_path / "s", "--teacher", t, "--data", tiny_run["tdata"], "--out", tmp_path / "c2",
           "--set", "target_accuracy=1.01")  # fmt: skip
    decisions = pq.read_table(tmp_path / "c2" / "decisions")
    metrics = json.loads((tmp_path / "c2" / "metrics.json").read_text())
    assert set(decisions.column("route").to_pylist()) == {"teacher"}
    assert metrics["accuracy"] == metrics["teacher_accuracy"]
    assert metrics["cost_vs_teacher_flops"] > 1.0  # the student ran too, for nothing

    # reuse the first policy on a new run: same routing without calibration
    cli.ok("cascade", "--student", tmp_path / "s", "--teacher", t, "--data", tiny_run["tdata"], "--out", tmp_path / "c3",
           "--policy-file", tmp_path / "c" / "policy.json")  # fmt: skip
    assert set(pq.read_table(tmp_path / "c3" / "decisions").column("route").to_pylist()) == {"student"}
    cli.fails("cascade", "--student", tmp_path / "s", "--teacher", t, "--data", tiny_run["tdata"], "--out", tmp_path / "c4",
              "--policy", "views", "--policy-file", tmp_path / "c" / "policy.json", match="calibrates policy")  # fmt: skip


def test_views_policy_routes_by_agreement(cli, tiny_run, tmp_path):
    cli.ok("cascade", "--student", tiny_run["teacher"], "--teacher", tiny_run["teacher"], "--data", tiny_run["tdata"],
           "--out", tmp_path / "v", "--policy", "views", "--set", "views=4")  # fmt: skip
    decisions = pq.read_table(tmp_path / "v" / "decisions")
    conf = np.asarray(decisions.column("confidence"))
    assert set(np.round(conf * 4).astype(int)) <= {1, 2, 3, 4}  # agreement is a share of 4 views
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics["flops_per_row"] >= 4 * metrics["flops_per_row"] / (4 + metrics["teacher_rate"]) - 1e-6


def test_bootstrap_calibration_is_more_conservative_than_the_point_estimate():
    rng = np.random.default_rng(0)
    n = 300
    labels = np.zeros(n, dtype=int)
    conf = rng.random(n)
    s_ans = np.where(rng.random(n) < 0.03 + 0.1 * (conf < 0.3), 1, 0)  # ~3-6% student errors, more at low confidence
    t_ans = np.where(rng.random(n) < 0.01, 1, 0)
    point, _ = calibrate(conf, s_ans, t_ans, labels, 0.0, margin=0.005)
    boot, curve = calibrate(conf, s_ans, t_ans, labels, 0.0, margin=0.005, level=0.9, seed=1)
    assert boot > point  # needs a higher threshold (more deferral) to hold in 90% of resamples
    met = [c["target_met"] for c in curve]
    assert met[0] == 1.0  # everything to the teacher is always within the margin of the teacher
    chosen = next(c for c in curve if c["threshold"] == boot)
    assert chosen["target_met"] >= 0.9
