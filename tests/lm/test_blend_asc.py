"""The ``blend-asc`` cascade policy's allocation: the budget goes to the undecided queries and its
total is what was asked (through the CLI: ``test_cascade_lm``)."""

from __future__ import annotations

import pytest

from stages.lm.blend_asc import blend_step, next_round, undecided
from stages.lm.cascade_cost import Draw


class Script:
    """A sampler whose answers follow a per-prompt script: prompt "easy" always answers 7, "hard"
    answers a, b, a, b, ... (its vote stays tied), one answer per sample in order."""

    def __init__(self):
        self.drawn: dict[str, int] = {}

    def draw(self, lm, prompts, k, temperature, round_=0):
        out = Draw()
        for p in prompts:
            start = self.drawn.get(p, 0)
            self.drawn[p] = start + k
            answers = ["7"] * k if p.startswith("easy") else [("a", "b")[(start + j) % 2] for j in range(k)]
            out.answers.append(answers)
            out.texts.append(list(answers))
            out.completion_tokens.append([1] * k)
            out.prompt_tokens.append(3)
            out.seconds.append(0.0)
        return out


def _empty(n):
    return [{"answers": [], "texts": [], "student_answer": None, "agreement": None, "keep": False, "used": 0, "s_prompt": 0,
             "s_completion": 0, "seconds": 0.0, "v_prompt": 0, "v_completion": 0, "v_cost": 0.0} for _ in range(n)]  # fmt: skip


def test_the_statistics_rank_a_tie_as_less_decided_than_agreement():
    agree, tie = undecided(["x"] * 4), undecided(["x", "y", "x", "y"])
    assert agree[0] > 0.95 and tie[0] == pytest.approx(0.5)  # ASC: P(leader is the mode)
    assert tie[1] > agree[1]  # PPR-1v1: the evidence of a tie
    assert next_round([["x"] * 4, ["x", "y"], ["x"] * 3], cap=8, spent=0.3, room=1) == [1]
    assert next_round([["x"] * 8, ["x", "y"]], cap=8, spent=0.9, room=5) == [1]  # a query at the cap gets no more


def test_the_budget_goes_to_the_tied_queries_and_is_spent_exactly():
    prompts = [f"easy {i}" for i in range(12)] + [f"hard {i}" for i in range(4)]
    out = blend_step(16, 4.0, 0.7, Script(), None, prompts, _empty(len(prompts)))
    used = [o["used"] for o in out]
    assert sum(used) == 4 * len(prompts) and max(used) <= 16
    assert min(used[12:]) > max(used[:12])  # every tied query got more than any agreeing one
    assert all(o["keep"] and o["student_answer"] == "7" for o in out[:12])
    assert all(o["s_prompt"] >= 3 for o in out)


@pytest.mark.parametrize("budget", [1.5, 4.0, 8.0])
def test_the_mean_samples_per_query_is_the_budget_when_queries_are_at_different_rounds(budget):
    prompts = [f"easy {i}" for i in range(40)] + [f"hard {i}" for i in range(20)]
    out = blend_step(16, budget, 0.7, Script(), None, prompts, _empty(len(prompts)))
    assert sum(o["used"] for o in out) == round(budget * len(prompts)) and max(o["used"] for o in out) <= 16


def test_a_budget_of_n_is_fixed_n_self_consistency():
    prompts = ["easy 0", "hard 0", "hard 1"]
    out = blend_step(5, 5.0, 0.7, Script(), None, prompts, _empty(3))
    assert [o["used"] for o in out] == [5, 5, 5] and [o["answers"] for o in out][1] == ["a", "b", "a", "b", "a"]
