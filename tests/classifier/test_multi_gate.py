"""``multi-gate``: multi-task students (the label and maps of it) with gates over experts (HoME,
GMoPE, FlexMoRE, the shared-bottom baseline), KD of every task from one teacher, and tasks in
sequence with forgetting recorded."""

from __future__ import annotations

import json

import pytest
import torch

from stages.classifier.methods.multi_gate import forgetting
from stages.classifier.models import load_classifier
from stages.classifier.multitask import GatedMultiTask, sparse, task_labels, task_map
from stages.errors import DistilError

TASKS = ["label", "parity", "round"]


def test_tasks_are_maps_of_the_digit_and_a_teacher_distribution_sums_over_them():
    y = torch.arange(10)
    model = GatedMultiTask("home", ["label", "parity", "high", "round", "prime"], 64, 8, 10)
    assert task_labels(model, 0, y).tolist() == list(range(10))
    assert task_labels(model, 1, y).tolist() == [0, 1] * 5
    assert task_labels(model, 2, y).tolist() == [0] * 5 + [1] * 5
    assert task_labels(model, 3, y).tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    assert task_labels(model, 4, y).tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 0, 0]
    p = torch.softmax(torch.randn(3, 10), -1)
    q = p @ task_map("parity", 10)
    assert torch.allclose(q[:, 1], p[:, 1::2].sum(-1)) and torch.allclose(q.sum(-1), torch.ones(3))
    with pytest.raises(DistilError, match="map of the 10 digits"):
        task_map("parity", 3)
    with pytest.raises(DistilError, match="unknown task 'colour'"):
        task_map("colour", 10)
    with pytest.raises(DistilError, match="start with label"):
        GatedMultiTask("home", ["parity", "label"], 64, 8, 10)
    with pytest.raises(DistilError, match="one positive rank per expert"):
        GatedMultiTask("flexmore", TASKS, 64, 8, 10, ranks=[])


def test_top_1_routing_trains_only_the_chosen_experts_and_keeps_the_gate_trainable():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(6, 4), -1)
    s = sparse(w, 1)
    assert ((s > 0).sum(-1) == 1).all() and torch.equal(s.max(-1).values, w.max(-1).values)  # not renormalised
    model = GatedMultiTask("home", TASKS, 64, 8, 10, experts=3, task_experts=1, top_k=1)
    x = torch.rand(1, 64)
    logits, gates = model.task_outputs(x)
    chosen = int(gates[1][0].argmax())
    logits[1].sum().backward()
    experts = [*model.shared, *model.own[1]]
    for e, expert in enumerate(experts):
        grad = expert.linear.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (e == chosen)
    assert model.gates[1].weight.grad.abs().sum() > 0 and model.heads[0].weight.grad is None


def test_prompt_experts_orthogonality_and_rank_heterogeneous_adapters():
    gm = GatedMultiTask("gmope", TASKS, 4, 8, 10, experts=3)
    with torch.no_grad():
        gm.prompts.copy_(torch.eye(4)[:3])
    assert float(gm.orthogonality().detach()) == pytest.approx(0.0)
    with torch.no_grad():
        gm.prompts[1] = gm.prompts[0]
    assert float(gm.orthogonality().detach()) == pytest.approx(2.0)  # cos = 1, counted both ways
    fm = GatedMultiTask("flexmore", TASKS, 64, 8, 10, ranks=[1, 4, 16])
    assert [a.shape[0] for a in fm.down] == [1, 4, 16] and fm.gate_size() == 3
    outs = fm._outputs(torch.rand(2, 64))
    assert all(torch.allclose(o, outs[0]) for o in outs)  # B = 0 at the start: every expert is the shared layer


def test_forgetting_is_the_best_earlier_accuracy_minus_the_last():
    matrix = [[0.9], [0.8, 0.95], [0.7, 0.97, 0.9]]
    assert forgetting(matrix) == pytest.approx([0.2, -0.02])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import digits_cli

    root = tmp_path_factory.mktemp("multi_gate")
    cli = digits_cli(root, width=16)
    cli.ok("distill", "--method", "ce", "--data", "digits", "--set", "model.width=64", "--set", "epochs=6", "--out", root / "t", "-q")
    return cli, root / "t"


@pytest.mark.parametrize("kind", ["home", "gmope", "flexmore", "shared-bottom"])
def test_each_student_trains_every_task_and_evaluate_reports_tasks_and_utilisation(teacher, tmp_path, kind):
    cli, t = teacher
    cli.ok("distill", "--method", "multi-gate", "--data", "digits", "--teacher", t, "--set", f"mt_kind={kind}",
           "--set", f"mt_tasks=[{','.join(TASKS)}]", "--set", "epochs=6", "--out", tmp_path / "m", "-q")  # fmt: skip
    model, config = load_classifier(tmp_path / "m")
    assert config["multitask"]["kind"] == kind and model(torch.rand(3, 64)).shape == (3, 10)
    cli.ok("evaluate", "--model", tmp_path / "m", "--data", "digits", "--out", tmp_path / "ev", "-q")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["m"]
    assert m["task_label_accuracy"] == pytest.approx(m["accuracy"])
    assert m["task_parity_accuracy"] > 0.75 and m["task_round_accuracy"] > 0.75  # chance is about 0.5 / 0.6
    if kind == "shared-bottom":
        assert "expert_utilisation" not in m
    else:
        use = m["expert_utilisation"]
        assert set(use) == set(TASKS) and all(sum(v) == pytest.approx(1.0, abs=1e-3) for v in use.values())


def test_tasks_in_sequence_record_the_accuracy_matrix_and_forgetting(teacher, tmp_path):
    cli, t = teacher
    cli.ok("distill", "--method", "multi-gate", "--data", "digits", "--teacher", t, "--set", "mt_sequential=true",
           "--set", "mt_top_k=1", "--set", f"mt_tasks=[{','.join(TASKS)}]", "--set", "epochs=4", "--out", tmp_path / "m", "-q")  # fmt: skip
    s = json.loads((tmp_path / "m" / "training.json").read_text())
    assert [len(r) for r in s["accuracy_matrix"]] == [1, 2, 3] and len(s["forgetting"]) == 2
    assert s["forgetting"] == pytest.approx(forgetting(s["accuracy_matrix"]))
    assert s["accuracy_matrix"][-1][0] == pytest.approx(s["dev_tasks"]["task_label_accuracy"])


def test_multi_gate_bad_input(teacher, tmp_path):
    cli, t = teacher
    cli.fails("distill", "--method", "multi-gate", "--data", "digits", "--teacher", t, "--set", "mt_tasks=[label,colour]",
              "--out", tmp_path / "a", "-q", match="unknown task 'colour'")  # fmt: skip
    cli.fails("distill", "--method", "multi-gate", "--data", "digits", "--teacher", t, "--set", "mt_kind=switch",
              "--out", tmp_path / "b", "-q", match="mt_kind")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
