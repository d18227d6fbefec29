"""The one LM answer scorer and the one majority vote (``stages.lm.scoring``): properties of
the vote first (ties to the first seen, normalisation, None handling, vote counts), then the
scorer on task items and on gold answers."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from stages.lm.scoring import agree, majority, majority_index, scorer, tally, vote_counts, winner
from stages.tasks.reasoning import ReasoningTask, normalise

# a few answers, each with spellings that normalise alike, and unparsed samples (None)
SPELLINGS = {"7": ["7", " 7.", "7 "], "x y": ["x y", "X  Y", "x y."], "b": ["b", "B"], "12": ["12"]}
ANSWER = st.one_of(st.none(), st.sampled_from([s for v in SPELLINGS.values() for s in v]))
ANSWERS = st.lists(ANSWER, max_size=12)


def reference(answers):
    """Counter.most_common on the normalised answers: the vote the call sites used to count."""
    votes = Counter(normalise(a) for a in answers if a is not None)
    if not votes:
        return None, 0
    key, count = votes.most_common(1)[0]
    return next(a for a in answers if a is not None and normalise(a) == key), count


@given(ANSWERS)
def test_majority_is_the_counter_vote_in_its_first_spelling(answers):
    assert majority(answers) == reference(answers)


@given(st.lists(st.sampled_from(list(SPELLINGS)), min_size=1, max_size=4, unique=True), st.integers(1, 3))
def test_ties_go_to_the_answer_seen_first(distinct, times):
    answers = [a for _ in range(times) for a in distinct]  # every answer the same number of votes
    assert majority(answers) == (distinct[0], times)
    assert majority_index(answers) == 0


@given(ANSWERS, st.lists(st.integers(0, 12), max_size=5))
def test_unparsed_answers_never_vote(answers, where):
    with_none = list(answers)
    for i in where:
        with_none.insert(min(i, len(with_none)), None)
    assert majority(with_none) == majority(answers)
    assert vote_counts(with_none) == vote_counts(answers)
    assert majority([None] * len(where)) == (None, 0) and majority_index([None] * len(where)) is None


@given(ANSWERS)
def test_spellings_of_one_answer_vote_together(answers):
    canonical = [None if a is None else normalise(a) for a in answers]
    answer, votes = majority(answers)
    assert votes == majority(canonical)[1]
    assert (answer is None) == (votes == 0)
    if answer is not None:
        assert normalise(answer) == majority(canonical)[0]


@given(ANSWERS)
def test_vote_counts_sum_to_the_parsed_answers_most_first(answers):
    counts = vote_counts(answers)
    assert sum(counts) == sum(a is not None for a in answers)
    assert counts == sorted(counts, reverse=True)
    assert (counts[0] if counts else 0) == majority(answers)[1]


@given(ANSWERS)
def test_majority_index_is_the_first_sample_of_the_majority(answers):
    i = majority_index(answers)
    answer, _ = majority(answers)
    if answer is None:
        assert i is None
        return
    assert answers[i] == answer
    assert all(a is None or normalise(a) != normalise(answer) for a in answers[:i])


def test_weights_sum_per_answer_and_keep_first_seen_ties():
    votes = tally(["a", None, "A.", "b"], [0.25, 9.0, 0.25, 0.5])
    assert [(v.answer, v.first, v.votes) for v in votes.values()] == [("a", 0, 0.5), ("b", 3, 0.5)]
    assert winner(votes).answer == "a" and winner({}) is None


@given(ANSWER, ANSWER)
def test_two_answers_agree_when_they_normalise_alike_and_both_parsed(a, b):
    assert agree(a, b) == agree(b, a) == (a is not None and b is not None and normalise(a) == normalise(b))
    assert agree(a, a) == (a is not None)


class FakeTask:
    def __init__(self):
        self.calls = []

    def score(self, answer, split, item):
        self.calls.append((answer, split, item))
        return 0.5


def test_task_items_are_scored_by_the_task_and_the_rest_by_gold():
    task = FakeTask()
    score = scorer(task)
    assert score({"split": "dev", "item": 3, "answer": "9"}, "4") == 0.5 and task.calls == [("4", "dev", 3)]
    # not a task item (-1, missing or None): normalised exact match with the gold answer
    for row in ({"split": "test", "item": -1, "answer": " 7."}, {"split": "test", "answer": "7"}, {"item": None, "answer": "7"}):
        assert score(row, "7") == 1.0 and score(row, "8") == 0.0 and score(row, None) == 0.0
    assert score({"item": None, "answer": None}, "7") is None  # no gold to score against
    assert len(task.calls) == 1
    assert scorer(None)({"split": "dev", "item": 3, "answer": "X y"}, "x  y.") == 1.0


def test_a_reasoning_task_scores_its_own_items():
    task = ReasoningTask("basic_arithmetic", sizes=(5, 5, 5))
    row = task.table().to_pylist()[0]
    score = scorer(task)
    assert score(row, row["answer"]) == 1.0 and score(row, "not an answer") == 0.0 and score(row, None) == 0.0
