"""rule_arithmetic: family rules fixed by family alone, train-only options, its scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from stages.errors import DistilError
from stages.tasks.mixture import build_task
from stages.tasks.rule_arithmetic import RULES, family_names, rule_of


def _rows(options=None, sizes=(400, 60, 60), seed=0):
    return build_task("rule_arithmetic", sizes=sizes, seed=seed, task_options=options, unlabeled=0).table().to_pylist()


def _family(prompt: str, names: list[str]) -> int:
    return names.index(re.search(r"Question: (\w+)\(", prompt).group(1))


def test_every_item_follows_its_familys_rule_and_the_worked_line_is_right():
    names = family_names(32)
    for r in _rows():
        f = _family(r["prompt"], names)
        a, b = map(int, re.search(r"\((\d), (\d)\)", r["prompt"]).groups())
        expression, value = r["answer"].split(" = ")
        assert expression == rule_of(f).format(a=a, b=b) and int(value) == eval(expression)
    assert len(set(names)) == 32 and family_names(32) == names  # fixed, whoever asks
    assert {rule_of(f) for f in range(len(RULES))} == set(RULES)


def test_train_options_narrow_train_only_and_dev_test_stay_the_same():
    names = family_names(32)
    full, seen = _rows(), _rows({"train_options": {"family_range": [0, 16]}})
    held = lambda rows: [(r["split"], r["prompt"]) for r in rows if r["split"] != "train"]  # noqa: E731
    assert held(full) == held(seen)
    train = [_family(r["prompt"], names) for r in seen if r["split"] == "train"]
    assert max(train) < 16 and len(set(train)) == 16
    assert any(_family(p, names) >= 16 for s, p in held(seen) if s == "test")
    test = {p for s, p in held(seen)}
    assert not any(r["prompt"] in test for r in seen if r["split"] == "train")
    assert Counter(_family(r["prompt"], names) >= 16 for r in full if r["split"] == "train")[True] > 100


def test_scorer_reads_the_value_after_the_last_equals():
    task = build_task("rule_arithmetic", sizes=(5, 5, 5), seed=0, task_options=None, unlabeled=0)
    row = next(r for r in task.table().to_pylist() if r["split"] == "test")
    value = row["answer"].split(" = ")[1]
    for answer, expected in [(row["answer"], 1.0), (value, 1.0), (f"1 + 1 = {value}.", 1.0), (f"{value}0", 0.0),
                             ("= ", 0.0), ("", 0.0)]:  # fmt: skip
        assert task.score(answer, "test", row["item"]) == expected, answer


@pytest.mark.parametrize("options", [{"family_range": [4, 2]}, {"families": 0}, {"train_options": 3}])
def test_bad_options_name_the_problem(options):
    with pytest.raises(DistilError, match="task_options"):
        _rows(options)
