"""Reasoning-gym tasks: fixed items, no test question in train, the package's own scorer."""

from __future__ import annotations

import pytest

from stages.errors import DistilError
from stages.tasks.reasoning import ReasoningTask, extract_answer, load_prompt_table


def test_items_are_fixed_by_seed_and_train_never_sees_held_out_questions():
    task = ReasoningTask("basic_arithmetic", sizes=(300, 40, 40), seed=0)
    a, b = task.table(), ReasoningTask("basic_arithmetic", sizes=(300, 40, 40), seed=0).table()
    assert a.equals(b)
    assert (
        a.column("prompt").to_pylist()
        != ReasoningTask("basic_arithmetic", sizes=(300, 40, 40), seed=1).table().column("prompt").to_pylist()
    )
    rows = a.to_pylist()
    held = {r["prompt"] for r in rows if r["split"] != "train"}
    train = [r for r in rows if r["split"] == "train"]
    assert train and not any(r["prompt"] in held for r in train)
    assert sum(r["split"] == "test" for r in rows) == 40
    assert rows[0]["prompt"].startswith("Question: ") and rows[0]["prompt"].endswith("\nAnswer:")


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "number_sorting", "gsm_symbolic", "rule_arithmetic"])
def test_the_gold_answer_scores_one_and_garbage_zero(name):
    task = ReasoningTask(name, sizes=(5, 5, 5))
    row = next(r for r in task.table().to_pylist() if r["split"] == "dev")
    assert task.score(row["answer"], row["split"], row["item"]) == 1.0
    assert task.score("not an answer", row["split"], row["item"]) == 0.0
    assert task.score(None, row["split"], row["item"]) == 0.0


def test_answer_extraction():
    assert extract_answer(" 42.\nmore text") == ("42", "ok")
    assert extract_answer("\n\nAnswer: -7") == ("-7", "ok")
    assert extract_answer("   \n ") == (None, "empty completion")


def test_unknown_task_and_user_tables(tmp_path):
    with pytest.raises(DistilError, match="unknown reasoning task"):
        ReasoningTask("chess")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?"}\n')
    t = load_prompt_table(jl)
    assert t.column("answer").to_pylist() == ["4", None] and set(t.column("split").to_pylist()) == {"test"}
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(DistilError, match="no prompt column"):
        load_prompt_table(tmp_path / "bad.jsonl")


def test_hub_style_datasets_load_through_datasets(tmp_path):
    from stages.config import DataConfig
    from stages.modality import of_data
    from stages.tasks import load_prompts

    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text('{"question": "1+1?", "gold": "2"}\n{"question": "2+2?", "gold": "4"}\n')
    (d / "validation.jsonl").write_text('{"question": "3+3?", "gold": "6"}\n')
    cfg = DataConfig(prompt_column="question", answer_column="gold")
    assert of_data(f"hf:{d}", cfg) == "lm"
    table, task = load_prompts(f"hf:{d}", cfg)
    assert task is None and table.column("split").to_pylist() == ["train", "train", "dev"]
    assert table.column("answer").to_pylist() == ["2", "4", "6"]
    with pytest.raises(DistilError, match="cannot load dataset"):
        load_prompts(f"hf:{tmp_path / 'missing'}", cfg)


def test_generator_options_shape_the_items():
    task = ReasoningTask(
        "chain_sum", sizes=(20, 5, 5), options=(("max_digits", 1), ("max_terms", 2), ("min_digits", 1), ("min_terms", 2))
    )
    for row in task.table().to_pylist():
        numbers = [t for t in row["prompt"].replace("=", " ").split() if t.lstrip("-").isdigit()]
        assert len(numbers) == 2 and all(len(n.lstrip("-")) == 1 for n in numbers)
    with pytest.raises(DistilError, match="rejects options"):
        ReasoningTask("chain_sum", sizes=(5, 5, 5), options=(("no_such_option", 1),)).table()


def test_unlabeled_prompts_extend_train_without_gold_but_stay_verifiable():
    base = ReasoningTask("basic_arithmetic", sizes=(30, 10, 10), seed=0).table().to_pylist()
    task = ReasoningTask("basic_arithmetic", sizes=(30, 10, 10), seed=0, unlabeled=50)
    rows = task.table().to_pylist()
    labelled = [r for r in rows if r["answer"] is not None]
    assert [(r["prompt"], r["answer"]) for r in labelled] == [(r["prompt"], r["answer"]) for r in base]
    extra = [r for r in rows if r["answer"] is None]
    assert len(extra) > 30 and all(r["split"] == "train" and r["item"] >= 30 for r in extra)
    gold = ReasoningTask("basic_arithmetic", sizes=(80, 10, 10), seed=0).table().to_pylist()
    same = ("id", "split", "prompt", "item")  # a teacher given every gold answer sees the students' very prompts
    assert [tuple(r[k] for k in same) for r in gold] == [tuple(r[k] for k in same) for r in rows]
    by_item = {r["item"]: r["answer"] for r in gold if r["split"] == "train"}
    assert all(task.score(by_item[r["item"]], "train", r["item"]) == 1.0 for r in extra[:5])


def test_splits_do_not_share_their_questions():
    """reasoning-gym draws item i of seed r from Random(r + i): splits seeded one apart
    would repeat each other's questions shifted by one item."""
    from stages.tasks.reasoning import ReasoningTask

    rows = ReasoningTask("basic_arithmetic", sizes=(60, 60, 60)).table().to_pylist()
    dev = [r["prompt"] for r in rows if r["split"] == "dev"]
    test = {r["prompt"] for r in rows if r["split"] == "test"}
    assert sum(q in test for q in dev) <= 3  # chance repeats only
    assert sum(r["split"] == "train" for r in rows) >= 55  # nearly no train item dropped as a held-out repeat
