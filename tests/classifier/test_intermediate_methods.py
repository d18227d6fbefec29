"""Intermediate-representation methods: the I_alpha bound (0 for an uninformative critic, a lower
bound on a known mutual information, lower variance with alpha), the hint and relation losses at
their minima, and ``fitnet``, ``mi-alpha`` and ``hybrid`` through the CLI: trained students whose
features carry more of their teachers' than a CE student's, and the teacher sets refused."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from stages.artifacts.store import list_column_to_numpy
from stages.classifier.models import load_classifier
from stages.config import DataConfig
from stages.losses.representation import cosine_scores, hint_mse, mi_alpha_bound, relation_kl, standardised
from stages.tasks import load_examples

FAST = ["--set", "epochs=2", "-q"]


def test_the_bound_is_zero_for_an_uninformative_critic_and_log_k_minus_one_at_most_for_infonce():
    flat = torch.full((16, 16), 1.0)
    assert float(mi_alpha_bound(flat, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(mi_alpha_bound(flat, 0.0)) == pytest.approx(0.0, abs=1e-6)  # NWJ at f = 1: 1 + 0 - e^0
    sharp = torch.zeros(16, 16).fill_diagonal_(30.0)
    assert float(mi_alpha_bound(sharp, 1.0)) == pytest.approx(math.log(15), abs=1e-4)
    with pytest.raises(ValueError):
        mi_alpha_bound(flat, 1.5)


def test_the_bound_stays_below_a_known_mutual_information_with_less_variance_as_alpha_grows():
    # y = rho x + sqrt(1 - rho^2) e in 2 dims: I(x; y) = -log(1 - rho^2), the optimal critic log p(y | x) / p(y)
    d, rho, k, v = 2, 0.9, 64, 1 - 0.9**2
    g = torch.Generator().manual_seed(0)
    values = {a: [] for a in (0.0, 0.5, 1.0)}
    for _ in range(150):
        x = torch.randn(k, d, generator=g, dtype=torch.float64)
        y = rho * x + math.sqrt(v) * torch.randn(k, d, generator=g, dtype=torch.float64)
        f = -((y[None] - rho * x[:, None]) ** 2).sum(-1) / (2 * v) - d / 2 * math.log(v) + (y[None] ** 2).sum(-1) / 2
        for a in values:
            values[a].append(float(mi_alpha_bound(f, a)))
    true = -d / 2 * math.log(v)
    means = {a: statistics.fmean(x) for a, x in values.items()}
    assert all(m < true for m in means.values()) and means[1.0] > 0.8 * true
    assert statistics.stdev(values[1.0]) < statistics.stdev(values[0.0])


def test_hint_and_relation_losses_vanish_at_the_teacher():
    t = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    assert float(hint_mse(standardised(t), t)) == pytest.approx(0.0, abs=1e-10)
    assert float(hint_mse(torch.zeros(32, 8), t)) == pytest.approx(0.5, rel=1e-5)  # unit variance per dimension
    assert float(relation_kl(t, t, 0.1)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_kl(torch.randn(32, 8), t, 0.1)) > 0.1
    s = cosine_scores(t, t, 0.5)
    assert s.shape == (32, 32) and torch.allclose(s.diagonal(), torch.full((32,), 2.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A CLI on 300 digits rows per split, with an MLP and a CNN teacher trained on them."""
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("inter")
    cli = digits_cli(root, width=32)
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", root / "mlp", "--set", "model.width=128", "--set",
           "epochs=10", "-q")  # fmt: skip
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", root / "cnn", "--set", "model.arch=cnn", "--set",
           "model.width=16", "--set", "epochs=10", "-q")  # fmt: skip
    return {"cli": cli, "mlp": root / "mlp", "cnn": root / "cnn"}


def _test_rows() -> torch.Tensor:
    part = load_examples("digits", DataConfig()).split("test")
    return torch.from_numpy(list_column_to_numpy(part.column("features"), "test features"))[:256].float()


def _bound_to_teacher(student_dir, teacher_dir, alpha=1.0) -> float:
    student, _ = load_classifier(student_dir)
    teacher, _ = load_classifier(teacher_dir)
    x = _test_rows()
    with torch.no_grad():
        return float(mi_alpha_bound(cosine_scores(student.aux_logits(x), teacher.features(x), 0.1), alpha))


def test_fitnet_and_mi_alpha_students_carry_their_teachers_features(run, tmp_path):
    cli, t = run["cli"], run["cnn"]
    for method in ("fitnet", "mi-alpha"):
        cli.ok("distill", "--method", method, "--data", "digits", "--out", tmp_path / method, "--teacher", t,
               "--set", "epochs=10", "-q")  # fmt: skip
        summary = json.loads((tmp_path / method / "training.json").read_text())
        assert summary["method"] == method and "intermediate_loss_last" in summary
    # the projection head trained against the teacher's features, against a fitnet run with the intermediate term
    # switched off (the same head, untrained by it)
    cli.ok("distill", "--method", "fitnet", "--data", "digits", "--out", tmp_path / "off", "--teacher", t,
           "--set", "epochs=10", "--set", "feature_weight=0", "-q")  # fmt: skip
    assert _bound_to_teacher(tmp_path / "mi-alpha", t) > _bound_to_teacher(tmp_path / "off", t) + 0.5  # measured 0.61, -0.36


def test_hybrid_imitates_relations_of_one_teacher_and_features_of_the_other(run, tmp_path):
    cli, mlp = run["cli"], run["mlp"]
    cli.ok("distill", "--method", "hybrid", "--data", "digits", "--out", tmp_path / "h", "--teacher", mlp, "--teacher",
           run["cnn"], "--set", "epochs=10", "-q")  # fmt: skip
    summary = json.loads((tmp_path / "h" / "training.json").read_text())
    assert summary["relations_from"] == "mlp" and summary["features_from"] == "cnn"
    assert summary["relations_loss_last"] > 0 and summary["features_loss_last"] > 0
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", tmp_path / "ce", "--set", "epochs=10", "-q")
    x = _test_rows()
    teacher, _ = load_classifier(mlp)
    rel = {}
    for name in ("h", "ce"):
        student, _ = load_classifier(tmp_path / name)
        with torch.no_grad():
            rel[name] = float(relation_kl(student.features(x), teacher.features(x), 0.1))
    assert rel["h"] < 0.7 * rel["ce"]  # measured 0.009 against 0.027


def test_feature_methods_refuse_stored_logits_and_wrong_teacher_sets(cli, tiny_run, run, tmp_path):
    cli.fails("distill", "--method", "mi-alpha", "--data", tiny_run["selected"], "--out", tmp_path / "a", *FAST,
              match="runs the teacher itself")  # fmt: skip
    t = tiny_run["teacher"]
    cli.fails("distill", "--method", "hybrid", "--data", "digits", "--out", tmp_path / "b", *FAST, "--teacher", t,
              match="at least two teachers")  # fmt: skip
    cli.fails("distill", "--method", "hybrid", "--data", "digits", "--out", tmp_path / "c", *FAST, "--teacher", t,
              "--teacher", run["cnn"], "--teacher", t, match="exactly 2 teachers")  # fmt: skip
    cli.fails("distill", "--method", "mi-alpha", "--data", "digits", "--out", tmp_path / "d", *FAST, "--teacher", t,
              "--set", "mi_alpha=2", match="mi_alpha")  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abcd")
