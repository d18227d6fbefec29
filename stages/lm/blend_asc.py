"""The ``blend-asc`` cascade policy: self-consistency with one sample budget spread over a batch
of queries by how undecided each query's vote still is (Feng, Alonso and Odonnat, "Optimal
Self-Consistency for Efficient Reasoning with Large Language Models", 2025, section 5, Blend-ASC).

Fixed-n self-consistency spends n samples on every query, the easy ones too. A dynamic
allocation spends a total budget (``sample_budget`` samples per query on average over the
``query_batch`` queries routed together, at most ``samples`` on one query) where the votes are
close: every query first gets ``FIRST`` samples in one call, then each round one more sample goes
to the queries that rank as least decided, until the budget is spent. The answer is the majority
of the samples a query got; the teacher is not called (Blend-ASC is a self-consistency variant:
it saves samples, it does not defer).

The ranking blends the two statistics the paper blends, for votes v1 >= v2 of the two leading
answers among K distinct ones:

- Adaptive-Consistency's (Aggarwal et al., 2023): the posterior probability that the leader is the
  mode, P(p > 1/2) under p ~ Beta(v1 + 1, v2 + 1) (``scoring.leader_wins``); the lowest first.
  It is the better ranking at small budgets;
- PPR-1v1's (Jain et al., AISTATS 2022, the prior-posterior-ratio test of the leader against the
  runner-up): the Beta(v1 + 1, v2 + 1) density at 1/2 times (K - 1), the evidence that the two are
  still tied, which that test stops on when it falls below its level; the highest first. It is
  the asymptotically optimal one.

The paper weighs the ASC ranking early and the PPR-1v1 ranking late; its exact weights were not
available to us, so here the two ranks are mixed linearly in the share of the budget already
spent (all ASC at the start, all PPR-1v1 when the budget is gone). Nothing else is set by hand.
"""

from __future__ import annotations

import numpy as np

from stages.lm.scoring import leader_wins, majority, vote_counts

FIRST = 2
"""Samples every query gets in its first call (one vote cannot tell a tie from agreement)."""


def undecided(answers: list[str | None]) -> tuple[float, float]:
    """(ASC's posterior that the leader is the mode, PPR-1v1's tie evidence) of one query's votes."""
    from scipy.stats import beta


    counts = vote_counts(answers) + [0, 0]
    v1, v2, k = counts[0], counts[1], max(2, sum(c > 0 for c in counts))
    return leader_wins(v1, v2), float(beta.pdf(0.5, v1 + 1, v2 + 1)) * (k - 1)


def next_round(streams: list[list[str | None]], cap: int, spent: float, room: int) -> list[int]:
    """The queries that get one more sample this round (at most ``room``), least decided first by
    the blended rank; ``spent`` is the share of the budget used so far."""
    open_ = [i for i, s in enumerate(streams) if len(s) < cap]
    if not open_ or room < 1:
        return []
    stats = np.array([undecided(streams[i]) for i in open_])
    asc = np.argsort(np.argsort(stats[:, 0], kind="stable"), kind="stable")  # rank 0 = least confident leader
    ppr = np.argsort(np.argsort(-stats[:, 1], kind="stable"), kind="stable")  # rank 0 = most tied
    blend = (1 - spent) * asc + spent * ppr
    order = np.argsort(blend, kind="stable")[:room]
    return [open_[j] for j in order]


def blend_step(n: int, budget: float, temperature: float, sampler, student, prompts: list[str], out: list[dict]) -> list[dict]:
    """Fill ``out`` (one ``cascade.student_step`` record per prompt) with the allocation above:
    ``budget`` samples per query on average, at most ``n`` on one."""
    total = int(round(budget * len(prompts)))
    first = max(1, min(FIRST, n, total // max(len(prompts), 1)))
    streams: list[list[str | None]] = [[] for _ in prompts]
    calls = [0] * len(prompts)

    def take(idx: list[int], k: int) -> None:
        groups: dict[int, list[int]] = {}
        for i in idx:  # a query's c-th call is its round c (``Sampler``'s per-query seed); grouped before any is drawn
            groups.setdefault(calls[i], []).append(i)
        for c, group in sorted(groups.items()):
            draw(idx=group, k=k, round_=c)

    def draw(idx: list[int], k: int, round_: int) -> None:
        d = sampler.draw(student, [prompts[i] for i in idx], k, temperature, round_)
        for j, i in enumerate(idx):
            streams[i].extend(d.answers[j])
            o = out[i]
            o["texts"] = o["texts"] + d.texts[j]
            o["s_prompt"] += d.prompt_tokens[j]  # every call reads the prompt again
            o["s_completion"] += sum(d.completion_tokens[j])
            o["seconds"] += d.seconds[j]
            calls[i] += 1

    take(list(range(len(prompts))), first)
    spent = first * len(prompts)
    room = max(1, len(prompts) // 8)  # queries sampled per round: one batched call each round
    while spent < total and (idx := next_round(streams, n, spent / max(total, 1), min(room, total - spent))):
        take(idx, 1)
        spent += len(idx)
    for o, answers in zip(out, streams, strict=True):
        o["student_answer"], votes = majority(answers)
        o.update(answers=answers, agreement=votes / max(len(answers), 1), keep=True, used=len(answers))
    return out
