"""Digits domains (``data.domains``) and ``meta-dmoe``: per-domain expert teachers, an aggregator,
and the student's test-time adaptation to an unseen domain from unlabelled rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.classifier.methods.meta_dmoe import Aggregator, adapt
from stages.classifier.models import build_classifier, load_classifier
from stages.config import DataConfig
from stages.tasks import load_examples
from stages.tasks.domains import DOMAIN_STRIDE, domain_of

SOURCES = ["none", "flip"]


def _images(ex, domain: int) -> np.ndarray:
    t = ex.table
    rows = domain_of(t.column("id").to_numpy()) == domain
    return np.stack(t.column("features").to_numpy(zero_copy_only=False)[rows]).reshape(-1, 8, 8)


def test_domains_are_the_same_digits_transformed_and_split_alike():
    plain = load_examples("digits", DataConfig())
    ex = load_examples("digits", DataConfig(domains=["none", "rot90", "invert"]))
    n = plain.table.num_rows
    assert ex.table.num_rows == 3 * n and ex.domains == ["none", "rot90", "invert"]
    ids = ex.table.column("id").to_numpy()
    assert list(np.bincount(domain_of(ids))) == [n, n, n] and (ids % DOMAIN_STRIDE < n).all()
    base = _images(plain, 0)
    np.testing.assert_array_equal(_images(ex, 0), base)
    np.testing.assert_array_equal(_images(ex, 1), np.rot90(base, 1, axes=(1, 2)))
    np.testing.assert_allclose(_images(ex, 2), 1.0 - base)
    split = ex.table.column("split").to_numpy(zero_copy_only=False)
    assert (split[:n] == split[n : 2 * n]).all() and (split[:n] == plain.table.column("split").to_numpy(zero_copy_only=False)).all()
    assert ex.meta()["task"]["domains"] == ex.domains and "domains" not in plain.meta()["task"]
    limited = load_examples("digits", DataConfig(domains=["none", "rot90"], limit=10))  # per split and domain
    assert limited.table.num_rows == 2 * 3 * 10 and set(domain_of(limited.table.column("id").to_numpy())) == {0, 1}


def test_adaptation_steps_close_the_gap_to_the_aggregated_target_and_reach_the_aggregator():
    torch.manual_seed(0)
    student = build_classifier("mlp", 16, 1, 0.0, [1, 8, 8], 10)
    agg = Aggregator([12, 20], 16)
    x = torch.rand(32, 64)
    target = agg([torch.randn(32, 12), torch.randn(32, 20)], [0, 1])
    gap = lambda p: float(torch.nn.functional.mse_loss(torch.func.functional_call(student.trunk, p, (x,)), target).detach())  # noqa: E731
    before = gap(dict(student.trunk.named_parameters()))
    fast = adapt(student, x, target, 3, 0.5, create_graph=True)
    assert gap(fast) < 0.9 * before
    head = student.head(torch.func.functional_call(student.trunk, fast, (x,)))  # second order: the query loss reaches the aggregator
    head.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agg.proj[0].parameters())
    masked = agg([torch.randn(32, 12), torch.randn(32, 20)], [1])  # a masked expert takes no part
    assert masked.shape == (32, 16)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("meta_dmoe")
    cli = digits_cli(root, width=32)
    for d in SOURCES:
        cli.ok("distill", "--method", "ce", "--data", "digits", "--set", f"data.domains=[{d}]", "--set", "epochs=4",
               "--out", root / d, "-q")  # fmt: skip
    return cli, [root / d for d in SOURCES]


def _meta(cli, teachers, out, *extra):
    args = [a for t in teachers for a in ("--teacher", t)]
    return cli("distill", "--method", "meta-dmoe", "--data", "digits", "--set", f"data.domains=[{','.join(SOURCES)}]",
               *args, "--set", "epochs=3", "--set", "meta_epochs=2", "--out", out, "-q", *extra)  # fmt: skip


def test_meta_dmoe_saves_the_adapted_student_and_the_unadapted_one(experts, tmp_path):
    cli, teachers = experts
    done = _meta(cli, teachers, tmp_path / "m", "--set", "meta_target=rot180", "--set", "adapt_support=40")
    assert done.exit_code == 0, done.output
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["source_domains"] == SOURCES and summary["support_rows"] == 40 and summary["meta_target"] == "rot180"
    assert {"target_dev_accuracy_adapted", "target_dev_accuracy_unadapted", "erm_dev_accuracy"} <= summary.keys()
    adapted, config = load_classifier(tmp_path / "m")
    unadapted, _ = load_classifier(tmp_path / "m" / "unadapted")
    assert config["method"] == "meta-dmoe"
    a, u = adapted.state_dict(), unadapted.state_dict()
    assert torch.equal(a["head.weight"], u["head.weight"])  # adaptation moves the feature extractor only
    assert not torch.equal(a["trunk.1.weight"], u["trunk.1.weight"])
    done = cli("evaluate", "--data", "digits", "--set", "data.domains=[rot180]", "--model", tmp_path / "m",
               "--model", tmp_path / "m" / "unadapted", "--out", tmp_path / "ev", "-q")  # fmt: skip
    assert done.exit_code == 0, done.output


def test_meta_dmoe_bad_input(experts, tmp_path):
    cli, teachers = experts
    cli.fails("distill", "--method", "meta-dmoe", "--data", "digits", *[a for t in teachers for a in ("--teacher", t)],
              "--out", tmp_path / "a", "-q", match="needs data of several domains")  # fmt: skip
    assert "one expert --teacher per source domain" in _meta(cli, teachers[:1] * 3, tmp_path / "b").output
    assert "is a source domain" in _meta(cli, teachers, tmp_path / "c", "--set", "meta_target=flip").output
    assert "unknown domain 'upside'" in _meta(cli, teachers, tmp_path / "d", "--set", "meta_target=upside").output
    cli.fails("distill", "--method", "ce", "--data", "digits", "--set", "data.domains=[none,none]", "--out", tmp_path / "e",
              "-q", match="lists a domain twice")  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_a_killed_meta_dmoe_run_resumes_to_the_uninterrupted_weights(experts, tmp_path):
    from conftest import dies_on_call

    import stages.classifier.training as training
    from stages.artifacts import load_tensors

    cli, teachers = experts
    target = ["--set", "meta_target=rot180"]
    assert _meta(cli, teachers, tmp_path / "ref", *target).exit_code == 0
    with dies_on_call(training, "save_state", 4, KeyboardInterrupt):  # the first meta-training epoch, after 3 of CE
        assert _meta(cli, teachers, tmp_path / "again", *target).exit_code == 130
    assert _meta(cli, teachers, tmp_path / "again", *target).exit_code == 0
    for rel in ("model.safetensors", "unadapted/model.safetensors"):
        a, b = load_tensors(tmp_path / "again" / rel), load_tensors(tmp_path / "ref" / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel
