"""Scoring and voting on parsed LM answers, in one place for every LM command.

``scorer`` scores an answer against a prompt row: the task's own scorer for items of a
built-in reasoning task, else normalised exact match with the gold answer (``agree``). ``majority`` is
the self-consistency vote (Wang et al., 2023) that selection, evaluation, cascades, the
demonstration bank and the ``mst`` gate all take: answers are compared after
``stages.tasks.reasoning.normalise``, unparsed answers (None) never vote, and ties go to
the answer seen first, returned in its first spelling. ``tally`` is the count under it, for
the callers that need more than the winner (vote counts for adaptive stopping, the first
sample carrying the majority, weighted votes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import comb
from typing import Optional

from stages.tasks.reasoning import ReasoningTask, normalise

Scorer = Callable[[dict, Optional[str]], Optional[float]]
"""score(prompt row, answer) -> score, or None when the row has no gold answer."""


def scorer(task: ReasoningTask | None) -> Scorer:
    """The task's own scorer for reasoning-task items (``item`` >= 0), else normalised exact
    match with the row's gold ``answer``; None when there is no gold to score against."""

    def score(row: dict, answer: str | None) -> float | None:
        if task is not None and row.get("item") is not None and row["item"] >= 0:
            return task.score(answer, row["split"], row["item"])
        if row.get("answer") is None:
            return None
        return float(agree(answer, row["answer"]))

    return score


def agree(a: str | None, b: str | None) -> bool:
    """Two parsed answers are the same answer (compared normalised); an unparsed one agrees with nothing."""
    return a is not None and b is not None and normalise(a) == normalise(b)


@dataclass
class Vote:
    """One distinct answer of a tally: its first spelling, the index of the first sample
    that gave it, and its votes (a count, or a sum of weights)."""

    answer: str
    first: int
    votes: float


def tally(answers: Iterable[str | None], weights: Iterable[float] | None = None) -> dict[str, Vote]:
    """normalised answer -> its ``Vote``, in first-seen order; each parsed answer adds its
    weight (1 without ``weights``, so votes stay ints), unparsed ones (None) add nothing."""
    votes: dict[str, Vote] = {}
    pairs = zip(answers, weights, strict=True) if weights is not None else ((a, 1) for a in answers)
    for i, (a, w) in enumerate(pairs):
        if a is None:
            continue
        key = normalise(a)
        if key in votes:
            votes[key].votes += w
        else:
            votes[key] = Vote(a, i, w)
    return votes


def winner(votes: dict[str, Vote]) -> Vote | None:
    """The vote with the most votes, the first seen among equals (``max`` keeps the first
    maximum, as ``Counter.most_common`` does); None for an empty tally."""
    return max(votes.values(), key=lambda v: v.votes) if votes else None


def majority(answers: Iterable[str | None]) -> tuple[str | None, int]:
    """(answer in its first spelling, votes) of the most frequent parsed answer; ties go to
    the one seen first; (None, 0) when nothing parsed."""
    best = winner(tally(answers))
    return (best.answer, best.votes) if best is not None else (None, 0)


def majority_index(answers: Iterable[str | None]) -> int | None:
    """The index of the first sample giving the majority answer; None when nothing parsed."""
    best = winner(tally(answers))
    return best.first if best is not None else None


def vote_counts(answers: Iterable[str | None]) -> list[int]:
    """The votes of each distinct parsed answer, most first."""
    return sorted((v.votes for v in tally(answers).values()), reverse=True)


def leader_wins(lead: int, second: int) -> float:
    """Posterior probability that the leading answer's share beats the runner-up's (uniform
    prior, Beta(lead + 1, second + 1) > 1/2): P(Binomial(lead + second + 1, 1/2) <= lead)."""
    trials = lead + second + 1
    return sum(comb(trials, i) for i in range(lead + 1)) / 2.0**trials
