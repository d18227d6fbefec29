"""`distil cascade` for language models: votes, adaptive stopping, calibration, costs and
every policy through the CLI on tiny LMs (a teacher and a student with different
tokenizers) and a prompt table whose test questions also occur in its train split."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from one_thread import one_thread  # noqa: F401  (autouse: one torch thread for this module)

from stages.errors import DistilError
from stages.lm.cascade import ALWAYS_DEFER, LM_POLICIES, decide, first_round, rounds, weighted_vote
from stages.lm.cascade_cost import Pricer, break_even, pricers, sweep
from stages.lm.scoring import leader_wins, majority

SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot"}
LM = ["--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]
CASCADE = {"samples": 3, "max_new_tokens": 4, "demos": 2, "retriever": "bm25", "confidence": 0.0, "batch_size": 64,
           "query_batch": 8, "temperature": 1.0}  # fmt: skip


def _prompts(path: Path, splits: dict[str, int], seed: int = 0) -> list[dict]:
    rng, rows = random.Random(seed), []
    for split, n in splits.items():
        for _ in range(n):
            animal = rng.choice(sorted(SOUNDS))
            rows.append({"prompt": f"Question: what does the {animal} number {rng.randrange(12)} say?\nAnswer:",
                         "answer": SOUNDS[animal], "split": split})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows



@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A teacher (8 epochs, vocab 320) and a student (1 epoch, vocab 300), LM teacher data of
    a prompt table, teacher data with no train split, and teacher data of a reasoning task."""
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("cascade_lm")
    rows = _prompts(root / "p.jsonl", {"train": 60, "dev": 20, "test": 20})
    _prompts(root / "no_train.jsonl", {"dev": 6, "test": 6}, seed=1)
    c = Cli(write_params(root, cascade=CASCADE, data={"sizes": [30, 10, 10], "task_options": {"max_terms": 2, "max_digits": 1}}))
    train = ["distill", "--method", "sft", "--data", root / "p.jsonl", *LM]
    c.ok(*train, "--out", root / "t", "--set", "epochs=8", "--set", "lr=0.03", "--set", "lm.vocab_size=320")
    c.ok(*train, "--out", root / "s", "--set", "epochs=1", "--set", "lm.vocab_size=300")
    gen = ["--set", "samples=2", "--set", "max_new_tokens=4", "--set", "top_k=0", "-q"]
    for data, out in ((root / "p.jsonl", "td"), (root / "no_train.jsonl", "td_no_train"), ("chain_sum", "td_chain")):
        c.ok("generate-teacher-data", "--teacher", root / "t", "--data", data, "--out", root / out, *gen)
    return {"cli": c, "root": root, "rows": rows, **{k: root / k for k in ("t", "s", "td", "td_no_train", "td_chain")}}  # fmt: skip


def cascade(lm, out: Path, *args, data=None, quiet=True) -> tuple[list[dict], dict]:
    result = lm["cli"].ok("cascade", "--student", lm["s"], "--teacher", lm["t"], "--data", data or lm["td"], "--out", out,
                          *(["-q"] if quiet else []), *args)  # fmt: skip
    lm["output"] = result.output
    return pq.read_table(out / "decisions").to_pylist(), json.loads((out / "metrics.json").read_text())


# ---- votes, adaptive stopping, sweep, prices -----------------------------------------------


def test_majority_ignores_unparsable_answers_and_breaks_ties_by_first_seen():
    assert majority([None, "7", " 7.", None]) == ("7", 2)  # normalised: "7" and " 7." are one answer
    assert majority(["b", "a", "a", "b"]) == ("b", 2)
    assert majority([None, None]) == (None, 0)
    assert decide("sc-cascade", ["a", None, None], 3, 0.5) == (False, 3)  # 1 vote of 3: unparsable count in n
    assert decide("sc-cascade", ["a", "a", None], 3, 2 / 3) == (True, 3)


def test_weighted_vote_trusts_the_self_consistent_model():
    # the student splits 2:1 for "x"; a second model says "y" three times out of three
    answer, share = weighted_vote([["x", "x", "z"], ["y", "y", "y"]])
    assert answer == "y" and share == pytest.approx(1.0 / (2 / 3 + 1.0))
    answer, share = weighted_vote([["x", "x", "x"], ["y", None, None]])
    assert answer == "x" and share == pytest.approx(1.0 / (1.0 + 1 / 3))
    assert weighted_vote([[None], [None, None]]) == (None, 0.0)


def test_adaptive_routes_and_answers_like_all_n_samples_with_fewer_draws():
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 7)
        stream = [rng.choice(["a", "a", "b", "c", None]) for _ in range(n)]
        for threshold in [k / n for k in range(n + 1)] + [ALWAYS_DEFER]:
            keep, used = decide("adaptive", stream, n, threshold)
            assert (keep, n) == decide("sc-cascade", stream, n, threshold) and 0 <= used <= n
            if keep:  # the early answer is the one all n samples give
                assert majority(stream[:used])[0] == majority(stream)[0]
    assert decide("adaptive", ["a", "a", "a", "a", "a"], 5, 0.6) == (True, 3)  # 3 of 5 already decide it
    assert decide("adaptive", ["a", "b", "c", "d", "a"], 5, 0.6) == (False, 4)  # 3 of 5 is out of reach after a, b, c, d
    assert decide("adaptive", ["a", "b", "c", "a", "a"], 5, 0.8) == (False, 4)  # the first round draws 4 (4 of 5 can keep)


def test_confident_stopping_follows_the_beta_posterior_and_saves_samples():
    assert leader_wins(4, 0) == pytest.approx(31 / 32) and leader_wins(3, 0) == pytest.approx(15 / 16)
    assert leader_wins(0, 0) == 0.5 and leader_wins(5, 5) == pytest.approx(0.5)
    assert leader_wins(6, 1) > leader_wins(5, 1) > leader_wins(5, 2)
    n = 16
    assert first_round(n, 0.5, 0.95) == 4 and first_round(n, 0.5, 1.0) == 9  # 9 of 16 cannot be overtaken
    assert decide("adaptive", ["a"] * n, n, 0.5, 0.95) == (True, 4)
    assert decide("adaptive", ["a", "b", "a", "a", "a", "a"] + ["a"] * 10, n, 0.5, 0.95) == (True, 7)  # 5:1 gives 0.94, 6:1 0.965
    assert decide("adaptive", ["a", "b", "a", "b"] * 4, n, 0.75, 0.95) == (False, 10)  # 5 + 6 left < 12 of 16
    rng, saved, agree = random.Random(1), 0, 0
    for _ in range(300):  # a student right 90% of the time: the confident rule agrees with all n samples
        stream = [rng.choice(["a"] * 9 + ["b"]) for _ in range(n)]
        keep, used = decide("adaptive", stream, n, 0.5, 0.95)
        saved += n / used
        agree += keep == decide("sc-cascade", stream, n, 0.5)[0] and majority(stream[:used])[0] == majority(stream)[0]
    assert saved / 300 > 3 and agree >= 295
    assert rounds([0, 4, 6], n, 0.5, 0.95).tolist() == [0, 1, 3]


def test_sweep_picks_the_cheapest_threshold_meeting_the_target_or_the_best_within_budget():
    thresholds = np.array([0.0, 0.5, 1.0, ALWAYS_DEFER])
    keep = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    s_score, t_score = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])
    cost = np.where(keep, 1.0, 11.0)  # the teacher costs 10 on top of the student
    samples = np.full(keep.shape, 3)
    args = (thresholds, keep, s_score, t_score, cost, samples, 40.0)
    j, curve = sweep(*args, target=0.75, margin=None)
    assert j == 1 and [c["accuracy"] for c in curve] == [0.5, 0.75, 1.0, 1.0]
    assert sweep(*args, target=None, margin=0.0)[0] == 2  # teacher level: the cheapest threshold reaching 1.0
    assert sweep(*args, target=2.0, margin=None)[0] == 3  # out of reach: always defer
    # bootstrap: 0.75 holds at threshold 0.5 on dev as it is, but not in 90% of resamples; 1.0 always does
    assert sweep(*args, target=0.75, margin=None, level=0.9, seed=0)[0] == 2
    assert sweep(*args, target=1.0, margin=None, budget=0.5)[0] == 1  # cost 14 of 40 fits, 24 does not
    with pytest.raises(DistilError, match="budget"):
        sweep(*args, target=1.0, margin=None, budget=0.05)


def test_prices_flops_and_break_even():
    p, unit = pricers({}, {"student": 10, "teacher": 100})
    assert unit == "flops" and float(p["teacher"](3, 2)) == 2 * 100 * 5
    p, unit = pricers(
        {"student": {"input": 1, "output": 2}, "teacher": {"input": 10, "output": 20}}, {"student": 1, "teacher": 1}
    )
    assert unit == "price" and float(p["student"](1000, 500)) == pytest.approx(2.0)
    with pytest.raises(DistilError, match="not teacher"):
        pricers({"student": {"input": 1, "output": 2}}, {"student": 1, "teacher": 1})
    with pytest.raises(DistilError, match="unknown model"):
        pricers({"gpt": {"input": 1, "output": 2}}, {"student": 1, "teacher": 1})
    assert break_even(100.0, 3.0, 1.0) == 50.0 and break_even(100.0, 1.0, 1.0) is None
    assert isinstance(p["teacher"], Pricer)


def test_bank_puts_the_most_similar_demonstration_last_and_never_the_query_itself():
    from stages.lm.icd.bank import Bank, demo

    pairs = [("the cat says", "meow"), ("the dog says", "woof"), ("the cat number 3 says", "meow")]
    bank = Bank([demo(i, "train", "teacher_data", f"Question: {q}?\nAnswer:", a) for i, (q, a) in enumerate(pairs)],
                kind="bm25", embedder="unused")  # fmt: skip
    query = "Question: the cat number 3 says?\nAnswer:"
    ids = bank.retrieve([query], 2)[0]
    assert ids == [0, 1]  # the identical question (row 2) is left out; "the cat says" is nearest
    assert bank.prompt(ids, query) == (
        "Question: the dog says?\nAnswer: woof\n\nQuestion: the cat says?\nAnswer: meow\n\n" + query
    )
    bank.add([demo(9, "test", "online", "Question: the cat number 4 says?\nAnswer:", "meow")])
    assert len(bank) == 4 and bank.retrieve([query], 1) == [[3]]  # an online demonstration is searchable at once


# ---- the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(LM_POLICIES))
def test_every_policy_writes_a_coherent_decisions_table(lm, tmp_path, policy):
    extra = ["--model", lm["t"]] if policy == "weighted-vote" else []
    rows, m = cascade(lm, tmp_path / "c", "--policy", policy, *extra)
    n, demos = CASCADE["samples"], CASCADE["demos"] if policy in ("icd", "icd-sc-cascade", "adaptive", "weighted-vote", "blend-asc") else 0
    assert len(rows) == 20 == m["queries"] and m["policy"] == policy
    deferred = [r for r in rows if r["route"] == "teacher"]
    assert len(deferred) / len(rows) == pytest.approx(m["teacher_rate"])
    assert m["accuracy"] == pytest.approx(np.mean([r["score"] for r in rows]))
    assert m["cost"] == pytest.approx(sum(r["cost"] for r in rows)) and all(r["cost"] > 0 for r in rows)
    for r in rows:
        assert 0 <= r["samples_used"] <= n and len(r["demos_used"]) == demos
        assert r["student_completion_tokens"] <= 4 * r["samples_used"] and r["teacher_completion_tokens"] <= 4  # max_new_tokens
        assert (r["teacher_prompt_tokens"] > 0) == (r["route"] == "teacher")
        if r["route"] == "student":
            assert r["answer"] == r["student_answer"]
        if policy in ("sc-cascade", "icd-sc-cascade", "adaptive"):  # the route follows the agreement
            assert (r["route"] == "student") == (r["agreement"] >= m["threshold"] - 1e-6)
    if policy == "teacher":
        assert m["teacher_rate"] == 1.0 and m["samples_per_query"] == 0 and m["student_accuracy"] is None
    assert (m["teacher_rate"] == 0.0) if policy in ("student", "icd", "weighted-vote", "blend-asc") else True
    if policy == "weighted-vote":
        assert all(r["voter_completion_tokens"] > 0 and len(r["answers"]) == 2 * n for r in rows)
    manifest = json.loads((tmp_path / "c" / ".manifest.json").read_text())
    assert manifest["kind"] == "lm_cascade" and manifest["rows"] == 20
    used = list(csv.DictReader(open(tmp_path / "c" / "samples_used.csv")))
    assert sum(int(u["queries"]) for u in used) == 20
    assert {int(u["samples_used"]) for u in used} == {r["samples_used"] for r in rows}
    levels = list(csv.DictReader(open(tmp_path / "c" / "agreement.csv")))
    assert sum(int(a["queries"]) for a in levels) <= 20 and all(0 <= float(a["student_accuracy"]) <= 1 for a in levels)
    assert (tmp_path / "c" / "bank" / "rows").exists() == (demos > 0)


def _always_defer(lm, path: Path, policy: str) -> Path:
    """A policy file whose threshold no agreement reaches (calibration writes one when only the
    teacher meets the target)."""
    from stages.lm.models import lm_identity

    found = {"policy": policy, "samples": CASCADE["samples"], "student": lm_identity(lm["s"]), "teacher": lm_identity(lm["t"]),
             "threshold": ALWAYS_DEFER, "dev": None}  # fmt: skip
    path.write_text(json.dumps(found))
    return path


def test_threshold_zero_never_defers_and_above_one_always_does(lm, tmp_path):
    teacher_rows, teacher = cascade(lm, tmp_path / "teacher", "--policy", "teacher")
    rows, m = cascade(lm, tmp_path / "zero", "--policy", "sc-cascade", "--set", "threshold=0")
    assert {r["route"] for r in rows} == {"student"} and m["accuracy"] == m["student_accuracy"]
    rows, m = cascade(
        lm, tmp_path / "all", "--policy", "sc-cascade", "--policy-file", _always_defer(lm, tmp_path / "p.json", "sc-cascade")
    )
    assert {r["route"] for r in rows} == {"teacher"} and m["accuracy"] == teacher["accuracy"] == m["teacher_accuracy"]
    assert [r["answer"] for r in rows] == [r["answer"] for r in teacher_rows]  # the measured teacher answers them
    assert m["cost_vs_teacher"] > 1.0  # the student sampled for nothing
    policy = _always_defer(lm, tmp_path / "a.json", "adaptive")
    rows, m = cascade(lm, tmp_path / "adaptive", "--policy", "adaptive", "--policy-file", policy, "--set", "demos=0")
    assert m["samples_per_query"] == 0 and m["cost_vs_teacher"] == 1.0  # nothing can reach 1.5: no sample is drawn


def test_adaptive_stops_early_on_an_agreeable_student(lm, tmp_path):
    agreeable = ["--set", "temperature=0.0001", "--set", "threshold=0.6", "--set", "demos=0"]
    rows, m = cascade(lm, tmp_path / "a", "--policy", "adaptive", *agreeable)
    assert [r["samples_used"] for r in rows] == [2] * 20 and m["samples_per_query"] == 2 < CASCADE["samples"]
    nucleus = ["--set", "temperature=1.0", "--set", "top_p=0.000001", "--set", "threshold=0.6", "--set", "demos=0"]
    full, _ = cascade(lm, tmp_path / "f", "--policy", "sc-cascade", *nucleus)  # a tiny nucleus: the top token only
    assert all(len({str(a) for a in r["answers"]}) == 1 for r in full)
    assert [r["route"] for r in rows] == [r["route"] for r in full]  # two agreeing samples decide what three would
    assert sum(r["student_completion_tokens"] for r in rows) < sum(r["student_completion_tokens"] for r in full)


def test_demonstrations_never_include_the_querys_own_question(lm, tmp_path):
    alias = "sentence-transformers/all-minilm-l6-v2"  # the packaged model under its hub name
    rows, m = cascade(lm, tmp_path / "c", "--policy", "icd", "--set", "retriever=dense", "--set", f"embedder={alias}")
    bank = pq.read_table(tmp_path / "c" / "bank" / "rows").to_pylist()
    prompts = {i: r["prompt"] for i, r in enumerate(lm["rows"])}  # prompt table ids are row numbers
    assert m["retriever"] == "dense" and len(bank) == m["bank_size"] > 2
    assert sum(prompts[r["id"]] in {b["prompt"] for b in bank} for r in rows) >= 3  # the bank holds test questions
    for r in rows:
        assert len(r["demos_used"]) == 2 and all(bank[i]["prompt"] != prompts[r["id"]] for i in r["demos_used"])
    index = json.loads((tmp_path / "c" / "bank" / "index" / "index.json").read_text())
    assert index["kind"] == "dense" and index["rows"] == len(bank) and index["embedder"] == alias


def test_online_teacher_answers_join_the_bank_for_later_queries(lm, tmp_path):
    args = [
        "--policy",
        "icd-sc-cascade",
        "--policy-file",
        _always_defer(lm, tmp_path / "p.json", "icd-sc-cascade"),
        "--set",
        "query_batch=5",
    ]
    rows, m = cascade(lm, tmp_path / "on", *args, "--online")
    bank = pq.read_table(tmp_path / "on" / "bank" / "rows").to_pylist()
    added = [b for b in bank if b["source"] == "online"]
    assert m["bank_added"] == len(added) == sum(r["answer"] is not None for r in rows) > 0
    assert len(bank) == m["bank_size"] + len(added) and all(b["bank_id"] >= m["bank_size"] for b in added)
    for step in range(4):  # a step only sees what the teacher answered in earlier steps
        visible = m["bank_size"] + sum(r["answer"] is not None for r in rows[: 5 * step])
        assert all(i < visible for r in rows[5 * step : 5 * step + 5] for i in r["demos_used"])
    assert any(i >= m["bank_size"] for r in rows for i in r["demos_used"])
    _, offline = cascade(lm, tmp_path / "off", *args)
    assert offline["bank_added"] == 0 and offline["bank_size"] == m["bank_size"]


def test_teacher_policy_costs_exactly_teacher_only_in_flops_and_prices(lm, tmp_path):
    _, m = cascade(lm, tmp_path / "f", "--policy", "teacher")
    assert m["cost_vs_teacher"] == 1.0 and m["cost_unit"] == "flops" and m["cost"] == m["teacher_only_cost"]
    prices = "costs={student: {input: 0.5, output: 1.5}, teacher: {input: 3, output: 15}}"
    rows, m = cascade(lm, tmp_path / "p", "--policy", "sc-cascade", "--set", "threshold=0.5", "--set", prices)
    assert m["cost_unit"] == "price"
    for r in rows:
        expected = (0.5 * r["student_prompt_tokens"] + 1.5 * r["student_completion_tokens"]) / 1000
        expected += (3 * r["teacher_prompt_tokens"] + 15 * r["teacher_completion_tokens"]) / 1000
        assert r["cost"] == pytest.approx(expected)


def test_break_even_pays_the_bank_back_when_the_teacher_is_expensive(lm, tmp_path):
    prices = "costs={student: {input: 0.001, output: 0.001}, teacher: {input: 10, output: 10}}"
    _, m = cascade(lm, tmp_path / "c", "--policy", "icd", "--set", prices)
    saving = (m["teacher_only_cost"] - m["cost"]) / m["queries"]
    assert m["bank_cost"] > 0 and saving > 0 and m["break_even_queries"] == pytest.approx(m["bank_cost"] / saving)
    _, m = cascade(lm, tmp_path / "d", "--policy", "teacher")
    assert m["break_even_queries"] is None  # teacher-only saves nothing over itself


def test_calibration_then_policy_file_reuse_gives_identical_decisions(lm, tmp_path):
    rows, m = cascade(lm, tmp_path / "c", "--policy", "auto", quiet=False)
    assert m["policy"] == "icd-sc-cascade" and "calibrate on dev" in lm["output"]  # auto: the paper's method; a progress bar
    with open(tmp_path / "c" / "calibration.csv") as fh:
        curve = list(csv.DictReader(fh))
    n = CASCADE["samples"]
    assert [float(c["threshold"]) for c in curve] == pytest.approx([k / n for k in range(n + 1)] + [ALWAYS_DEFER])
    meeting = [c for c in curve if float(c["target_met"]) == 1.0]
    cheapest = min(float(c["cost"]) for c in meeting)
    assert m["threshold"] == pytest.approx(min(float(c["threshold"]) for c in meeting if float(c["cost"]) == cheapest))
    again, m2 = cascade(lm, tmp_path / "r", "--policy", "icd-sc-cascade", "--policy-file", tmp_path / "c" / "policy.json")
    for a, b in zip(rows, again, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert (tmp_path / "r" / "policy.json").read_text() == (tmp_path / "c" / "policy.json").read_text()
    assert m2["accuracy"] == m["accuracy"] and len((tmp_path / "r" / "calibration.csv").read_text().splitlines()) == 1
    lm["cli"].fails("cascade", "--student", lm["s"], "--teacher", lm["t"], "--data", lm["td"], "--out", tmp_path / "x",
                    "--policy", "icd-sc-cascade", "--set", "samples=4", "--policy-file", tmp_path / "c" / "policy.json",
                    match="samples")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_reasoning_task_queries_are_scored_by_the_tasks_own_scorer(lm, tmp_path):
    from stages.tasks.reasoning import ReasoningTask

    rows, m = cascade(lm, tmp_path / "c", "--policy", "sc-cascade", "--set", "threshold=0.5", data=lm["td_chain"])
    task = ReasoningTask("chain_sum", (30, 10, 10), 0, (("max_digits", 1), ("max_terms", 2)))
    assert len(rows) == 10 and all(r["item"] >= 0 for r in rows)
    assert [r["score"] for r in rows] == pytest.approx([task.score(r["answer"], "test", r["item"]) for r in rows])


def test_bad_input_exits_2_with_one_line_and_writes_nothing(lm, tmp_path):
    from stages.classifier.models import build_classifier, save_classifier

    classifier = tmp_path / "clf"
    config = {"arch": "mlp", "width": 8, "depth": 1, "dropout": 0.0, "input_shape": [4], "num_classes": 3}
    save_classifier(classifier, build_classifier("mlp", 8, 1, 0.0, [4], 3), config)
    out, base = tmp_path / "o", ["cascade", "--teacher", lm["t"], "--out", tmp_path / "o", "-q"]
    c = lm["cli"]
    c.fails(
        *base, "--student", lm["s"], "--data", lm["td"], "--policy", "magic", match="unknown policy 'magic' for language models"
    )
    c.fails(*base, "--student", classifier, "--data", lm["td"], "--policy", "icd", match="not a language model")
    c.fails(*base, "--student", lm["s"], "--data", lm["td_no_train"], "--policy", "icd", match="no train-split rows")
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "icd", "--set", "demos=500", match="yields")
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "weighted-vote", match="--model")
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "student", "--online", match="--online")
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "icd", "--set", "demos=20", match="context")
    c.fails(
        *base,
        "--student",
        lm["s"],
        "--data",
        lm["td"],
        "--policy",
        "teacher",
        "--set",
        "costs={student: 1}",
        match="costs.student",
    )
    c.fails(*base, "--student", lm["s"], "--data", lm["root"] / "p.jsonl", "--policy", "icd", match="teacher data")
    for bad in ("threshold=1.5", "threshold=-0.2"):
        c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "sc-cascade", "--set", bad,
                match="threshold must be in [0, 1] or -1, got")  # fmt: skip
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "adaptive", "--set", "stop_confidence=0.4",
            match="stop_confidence")  # fmt: skip
    other = _always_defer(lm, tmp_path / "other.json", "sc-cascade")  # calibrated for student s, teacher t
    c.fails(*base, "--student", lm["t"], "--data", lm["td"], "--policy", "sc-cascade", "--policy-file", other,
            match="calibrated for student")  # fmt: skip
    c.fails("cascade", "--student", classifier, "--teacher", classifier, "--data", "digits", "--out", out, "--online",
            match="language-model cascades")  # fmt: skip
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_budget_calibrates_to_the_most_accurate_threshold_within_it(lm, tmp_path):
    prices = "costs={student: {input: 0.01, output: 0.01}, teacher: {input: 1, output: 1}}"  # a student 100x cheaper
    _, m = cascade(lm, tmp_path / "b", "--policy", "sc-cascade", "--set", "budget=0.5", "--set", prices)
    policy = json.loads((tmp_path / "b" / "policy.json").read_text())
    with open(tmp_path / "b" / "calibration.csv") as fh:
        curve = list(csv.DictReader(fh))
    fits = [c for c in curve if float(c["cost_vs_teacher"]) <= 0.5]
    assert len(fits) < len(curve) and policy["dev"]["cost_vs_teacher"] <= 0.5 and policy["budget"] == 0.5
    assert policy["dev"]["accuracy"] == pytest.approx(max(float(c["accuracy"]) for c in fits))
    lm["cli"].fails("cascade", "--student", lm["s"], "--teacher", lm["t"], "--data", lm["td"], "--out", tmp_path / "x", "-q",
                    "--policy", "sc-cascade", "--set", "budget=0.001", "--set", prices, match="within budget")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_bank_verified_keeps_only_demonstrations_the_task_scored_correct(lm, tmp_path):
    gold = {r["prompt"]: r["answer"] for r in lm["rows"]}
    _, everything = cascade(lm, tmp_path / "all", "--policy", "icd", "--set", "demos=1")
    _, m = cascade(lm, tmp_path / "ok", "--policy", "icd", "--set", "demos=1", "--set", "bank_verified=true")
    bank = pq.read_table(tmp_path / "ok" / "bank" / "rows").to_pylist()
    assert 0 < m["bank_size"] < everything["bank_size"] and all(b["answer"] == gold[b["prompt"]] for b in bank)


def test_blend_asc_through_the_cli_answers_every_query_at_the_asked_mean(lm, tmp_path):
    rows, m = cascade(lm, tmp_path / "b", "--policy", "blend-asc", "--set", "samples=3", "--set", "sample_budget=2")
    assert m["teacher_rate"] == 0.0 and m["samples_per_query"] == pytest.approx(2.0)
    assert all(1 <= r["samples_used"] <= 3 and r["answer"] == r["student_answer"] for r in rows)
    assert json.loads((tmp_path / "b" / "policy.json").read_text())["sampling"]["sample_budget"] == 2.0


def test_a_budget_outside_its_range_or_for_another_policy_is_refused(lm, tmp_path):
    c = lm["cli"]
    base = ["cascade", "--teacher", lm["t"], "--out", tmp_path / "x", "-q"]
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "blend-asc", "--set", "samples=3",
            "--set", "sample_budget=4", match="sample_budget")  # fmt: skip
    c.fails(*base, "--student", lm["s"], "--data", lm["td"], "--policy", "sc-cascade", "--set", "sample_budget=2",
            match="sample_budget")  # fmt: skip
    assert not (tmp_path / "x").exists()
