"""``student-search`` (DisWOT): the relation and semantic matrices, a search that stays within its
parameter budget, ranks every candidate it scored and is deterministic, an exhaustive search
whose winner is the best candidate of the space, the winner trained and saved with its own
architecture, a rerun that trains the same winner, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from stages.classifier.methods.search import distance, relation_matrix, semantic_matrix
from stages.classifier.models import build_classifier, load_classifier

FAST = ["--set", "epochs=3", "-q"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("search")
    cli = digits_cli(root)
    cli.ok("distill", "--method", "ce", "--data", "digits", "--out", root / "cnn", "--set", "model.arch=cnn", "--set",
           "model.width=16", "--set", "epochs=8", "-q")  # fmt: skip
    return {"cli": cli, "teacher": root / "cnn", "root": root}


def test_the_matrices_are_normalised_and_a_model_is_at_distance_zero_from_itself():
    net = build_classifier("mlp", 16, 1, 0.0, [1, 8, 8], 10).requires_grad_(False)
    x = torch.randn(32, 64)
    g = relation_matrix(net.features(x))
    assert g.shape == (32, 32) and torch.allclose(g.norm(dim=1), torch.ones(32, dtype=torch.float64))
    s = semantic_matrix(net, x)
    assert s.shape == (10, 10) and torch.allclose(s, s.T) and torch.allclose(s.diagonal(), torch.ones(10, dtype=torch.float64))
    assert distance(g, g) == 0.0 and distance(torch.zeros_like(g), g) == pytest.approx(1.0)


def test_search_stays_in_budget_ranks_what_it_scored_and_trains_the_winner(run, tmp_path):
    cli = run["cli"]
    cli.ok("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "a", "--teacher", run["teacher"],
           *FAST)  # fmt: skip
    found = json.loads((tmp_path / "a" / "search.json").read_text())
    budget = 64 * 64 + 64 + 64 * 10 + 10  # the configured 64-unit MLP
    assert found["budget"] == budget and all(r["params"] <= budget for r in found["ranking"])
    scores = [r["score"] for r in found["ranking"]]
    assert scores == sorted(scores, reverse=True) and found["winner"] == found["ranking"][0]
    assert len(found["ranking"]) == found["evaluated"] <= 8 + 4 * 8 // 2
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    w = found["winner"]
    assert (config["arch"], config["width"], config["depth"]) == (w["arch"], w["width"], w["depth"])
    model, _ = load_classifier(tmp_path / "a")
    assert sum(p.numel() for p in model.parameters()) == w["params"]
    summary = json.loads((tmp_path / "a" / "training.json").read_text())
    assert summary["search_method"] == "kd" and summary["dev_accuracy"] > 0.5 and summary["search_cost_share"] > 0
    cli.ok("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "b", "--teacher", run["teacher"],
           *FAST)  # fmt: skip
    assert json.loads((tmp_path / "b" / "search.json").read_text())["ranking"] == found["ranking"]  # deterministic


def test_an_exhaustive_search_picks_the_best_candidate_of_the_space(run, tmp_path):
    cli = run["cli"]
    cli.ok("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "x", "--teacher", run["teacher"],
           "--set", "search_population=64", "--set", "search_generations=0", *FAST)  # fmt: skip
    found = json.loads((tmp_path / "x" / "search.json").read_text())
    assert found["evaluated"] == found["space"]  # every candidate scored
    assert {r["arch"] for r in found["ranking"]} == {"mlp", "cnn"}
    cli.ok("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "e", "--teacher", run["teacher"],
           "--set", "search_population=4", "--set", "search_generations=2", *FAST)  # fmt: skip
    evolved = json.loads((tmp_path / "e" / "search.json").read_text())
    assert evolved["evaluated"] < found["space"] and evolved["winner"]["score"] <= found["winner"]["score"]
    first = {(r["arch"], r["width"], r["depth"]): r["score"] for r in found["ranking"]}
    assert all(first[(r["arch"], r["width"], r["depth"])] == r["score"] for r in evolved["ranking"])  # one score per candidate


def test_student_search_refuses_an_impossible_budget_and_a_bad_training_method(run, tmp_path):
    cli = run["cli"]
    cli.fails("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "a", "--teacher", run["teacher"],
              "--set", "search_budget=50", *FAST, match="no candidate student has at most search_budget=50")  # fmt: skip
    cli.fails("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "b", "--teacher", run["teacher"],
              "--set", "search_method=mst", *FAST, match="needs several teachers")  # fmt: skip
    cli.fails("distill", "--method", "student-search", "--data", "digits", "--out", tmp_path / "c", *FAST,
              match="runs the teacher itself")  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abc")
