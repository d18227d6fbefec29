"""Every classifier method trains through the CLI on tiny data, with its own behaviour checked."""

from __future__ import annotations

import json

import pytest
import torch

from stages.classifier.methods import METHODS
from stages.classifier.models import load_classifier

FAST = ["--set", "epochs=2", "-q"]


def _training(path):
    return json.loads((path / "training.json").read_text())


@pytest.mark.parametrize("method", ["kd", "reverse-kl", "jsd", "skew-kl", "tvd", "pld", "ssld", "pskd", "mdcs"])
def test_single_model_methods_train_and_load(cli, tiny_run, tmp_path, method):
    extra = ["--set", "model.experts=3"] if method == "mdcs" else []
    cli.ok("distill", "--method", method, "--data", tiny_run["selected"], "--out", tmp_path / "m", *FAST, *extra)
    model, config = load_classifier(tmp_path / "m")
    assert config["method"] == method and config["class_counts"] and sum(config["class_counts"]) > 0
    x = torch.rand(5, 64)
    assert model(x).shape == (5, 10) and torch.isfinite(model(x)).all()
    assert len(_training(tmp_path / "m")["history"]) == 2


def test_every_listed_method_is_covered():
    covered = {"ce", "kd", "reverse-kl", "jsd", "skew-kl", "tvd", "pld", "ssld", "pskd", "mdcs",
               "self-distill", "anchored", "random-teacher", "sla-sd", "mst", "fitnet", "mi-alpha", "hybrid", "student-search", "competitive", "dataset-distill", "meta-dmoe", "multi-gate"}  # fmt: skip
    assert set(METHODS) == covered


def test_mdcs_experts_are_evaluated_with_diversity(cli, tiny_run, tmp_path):
    cli.ok(
        "distill", "--method", "mdcs", "--data", tiny_run["selected"], "--out", tmp_path / "m", *FAST, "--set", "model.experts=3"
    )
    assert load_classifier(tmp_path / "m")[0].expert_logits(torch.rand(2, 64)).shape == (2, 3, 10)
    cli.ok("evaluate", "--model", tmp_path / "m", "--data", tiny_run["tdata"], "--out", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["m"]
    assert {"expert0_accuracy", "expert2_accuracy", "expert_disagreement"} <= set(m)
    assert any(k.endswith("_shot_accuracy") for k in m)  # tiny data: every class is few-shot
    assert 0.0 <= m["expert_disagreement"] <= 1.0


def test_mdcs_needs_two_experts(cli, tiny_run, tmp_path):
    cli.fails(
        "distill", "--method", "mdcs", "--data", tiny_run["selected"], "--out", tmp_path / "m", *FAST, match="at least 2 experts"
    )
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_self_distill_records_rounds_and_saves_each_generation(cli, tiny_run, tmp_path):
    cli.ok("distill", "--method", "self-distill", "--data", "digits", "--out", tmp_path / "m", *FAST, "--set", "generations=2")
    rounds = _training(tmp_path / "m")["generations"]
    assert [r["generation"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["gt_weight"] == 1.0 and all(0.0 <= r["gt_weight"] <= 1.0 for r in rounds)
    for g in range(3):
        load_classifier(tmp_path / "m" / "generations" / f"g{g}")
    cli.ok("distill", "--method", "self-distill", "--data", "digits", "--out", tmp_path / "m0", *FAST,
           "--set", "generations=1", "--set", "gt_weight=0")  # fmt: skip
    assert _training(tmp_path / "m0")["generations"][1]["gt_weight"] == 0.0


def test_anchored_records_kl_to_the_base_teacher(cli, tiny_run, tmp_path):
    cli.ok(
        "distill",
        "--method",
        "anchored",
        "--data",
        tiny_run["selected"],
        "--out",
        tmp_path / "m",
        *FAST,
        "--set",
        "generations=2",
    )
    rounds = _training(tmp_path / "m")["generations"]
    assert len(rounds) == 3 and all(r["kl_to_base_train"] >= 0 for r in rounds)


def test_random_teacher_probes_student_and_teacher(cli, tiny_run, tmp_path):
    cli.ok(
        "distill", "--method", "random-teacher", "--data", "digits", "--out", tmp_path / "m", *FAST, "--set", "probe_epochs=50"
    )
    t = _training(tmp_path / "m")
    assert 0 <= t["teacher_probe_dev_accuracy"] <= 1 and 0 <= t["student_probe_dev_accuracy"] <= 1
    teacher, _ = load_classifier(tmp_path / "m" / "random_teacher")
    student, _ = load_classifier(tmp_path / "m")
    x = torch.rand(4, 64)
    assert not torch.allclose(teacher.features(x), student.features(x))  # the student moved away from its teacher


def test_random_teacher_probe_beats_chance_with_frozen_random_features(cli, tmp_path):
    # even a random trunk carries signal: the probe must learn it (a broken probe stays at 10%)
    cli.ok("distill", "--method", "random-teacher", "--data", "digits", "--out", tmp_path / "m", "-q",
           "--set", "epochs=1", "--set", "data.limit=0")  # fmt: skip
    assert _training(tmp_path / "m")["teacher_probe_dev_accuracy"] > 0.5


def test_sla_sd_joint_head_and_image_requirement(cli, tiny_run, tmp_path):
    cli.ok("distill", "--method", "sla-sd", "--data", "digits", "--out", tmp_path / "m", *FAST)
    model, config = load_classifier(tmp_path / "m")
    assert config["aux_classes"] == 40 and "aggregated_dev_accuracy" in _training(tmp_path / "m")
    csv = tmp_path / "flat.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    cli.fails("distill", "--method", "sla-sd", "--data", csv, "--out", tmp_path / "x", *FAST, match="rotates square images")


def test_mst_gates_over_several_teachers(cli, tiny_run, tmp_path):
    cli.ok("distill", "--section", "teacher", "--data", "digits", "--out", tmp_path / "t2", "--seed", "7", "-q")
    cli.ok("distill", "--method", "mst", "--data", "digits", "--out", tmp_path / "m", *FAST,
           "--teacher", tiny_run["teacher"], "--teacher", tmp_path / "t2")  # fmt: skip
    share = _training(tmp_path / "m")["teacher_share"]
    assert len(share) == 2 and abs(sum(share) - 1) < 1e-6


def test_mst_rejects_bad_teacher_sets(cli, tiny_run, tmp_path):
    cli.fails("distill", "--method", "mst", "--data", "digits", "--out", tmp_path / "m", *FAST, "--teacher", tiny_run["teacher"],
              match="at least two teachers")  # fmt: skip
    cli.fails("distill", "--method", "mst", "--data", "digits", "--out", tmp_path / "m", *FAST,
              "--teacher", tiny_run["teacher"], "--teacher", tmp_path / "missing", match="not a distil model")  # fmt: skip
    # a teacher trained on a 3-class table cannot join a 10-class mixture
    csv = tmp_path / "three.csv"
    csv.write_text(",".join([f"f{i}" for i in range(64)] + ["label"]) + "\n"
                   + "".join(",".join(["0.5"] * 64 + [str(i % 3)]) + "\n" for i in range(60)))  # fmt: skip
    cli.ok("distill", "--method", "ce", "--data", csv, "--out", tmp_path / "t3", *FAST)
    cli.fails("distill", "--method", "mst", "--data", "digits", "--out", tmp_path / "m", *FAST,
              "--teacher", tiny_run["teacher"], "--teacher", tmp_path / "t3", match="classes")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_ssld_uses_unlabelled_rows_and_ce_does_not(cli, tiny_run, tmp_path):
    for method in ("ssld", "ce"):
        cli.ok("distill", "--method", method, "--data", tiny_run["selected"], "--out", tmp_path / method, *FAST,
               "--set", "labeled_fraction=0.25")  # fmt: skip
    ssld, ce = _training(tmp_path / "ssld"), _training(tmp_path / "ce")
    assert ssld["train_rows"] > ssld["labeled_rows"] and ce["train_rows"] == ce["labeled_rows"] == ssld["labeled_rows"]


def test_a_teacherless_method_refuses_a_teacher(cli, tiny_run, tmp_path):
    cli.fails("distill", "--method", "pskd", "--data", "digits", "--out", tmp_path / "m", "--teacher", tiny_run["teacher"],
              match="uses no teacher")  # fmt: skip
