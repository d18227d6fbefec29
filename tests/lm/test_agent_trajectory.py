"""Agent trajectories (``stages.lm.agent.trajectory``): verified gold trajectories of large-number
arithmetic, observation tokens out of the loss, and the agent loop with scripted models: the tool
runs, a failing or runaway snippet is an observation, self-consistent actions keep the majority."""

from __future__ import annotations

import pytest

from stages.lm.agent.sandbox import Limits
from stages.lm.agent.trajectory import act, answer_of, code_of, encode, expression, gold, observation_spans
from stages.tasks.reasoning import ReasoningTask

QUICK = Limits(seconds=0.5, memory_mb=128)
BIG = tuple(sorted({"min_digits": 5, "max_digits": 6, "min_terms": 3, "max_terms": 4}.items()))


def test_gold_trajectories_of_large_number_sums_are_verified_by_the_tool():
    rows = ReasoningTask("chain_sum", sizes=(20, 1, 1), options=BIG).table().to_pylist()[:20]
    for r in rows:
        t = gold(r["prompt"], r["answer"], QUICK)
        assert t is not None and answer_of(t) == str(r["answer"]) and code_of(t) == f"print({expression(r['prompt'])})"
    assert gold(rows[0]["prompt"], "12345", QUICK) is None  # an answer the tool does not confirm is no gold
    assert gold("Question: how many legs does a spider have?\nAnswer:", "8", QUICK) is None  # no expression


def test_encode_keeps_observations_out_of_the_loss():
    from stages.lm.models import train_tokenizer

    traj = "Thought: compute\nCode: print(123456 + 654321)\nObservation: 777777\nAnswer: 777777"
    tok = train_tokenizer([f"Question: 123456 + 654321 =\nAnswer: {traj}"] * 20, vocab_size=300)
    ids, labels = encode(tok, "Question: 123456 + 654321 =\nAnswer:", traj, 128)
    assert len(ids) == len(labels) and labels[-1] == tok.eos_token_id
    (a, b), = observation_spans(traj)
    assert traj[a:b].strip() == "777777"
    kept = tok.decode([t for t, y in zip(ids, labels, strict=True) if y != -100])
    masked = tok.decode([t for t, y in zip(ids, labels, strict=True) if y == -100])
    assert "print" in kept and "777777" in masked.replace(" ", "")
    assert kept.replace(" ", "").count("777777") == 1  # the answer line is learned, the observation is not


def scripted(answers: dict[str, list[str]]):
    """``generate`` for ``act``: per prompt (its first word), the continuations to hand out in turn."""
    calls: dict[str, int] = {}

    def generate(texts, n, stop):
        out = []
        for t in texts:
            key = t.split()[0]
            for _ in range(n):
                k = calls.get(key, 0)
                calls[key] = k + 1
                out.append(answers[key][min(k, len(answers[key]) - 1)])
        return out

    return generate


def test_the_agent_runs_the_tool_and_answers_after_its_observation():
    gen = scripted({"Q1": [" Thought: compute\nCode: print(120000 + 3456)\nObservation:", "Answer: 123456"]})
    (t,) = act(gen, ["Q1 what is 120000 + 3456?"], max_calls=2, limits=QUICK)
    assert t.tool_calls == 1 and t.steps[0].ok and t.steps[0].observation == "123456"
    assert "Observation: 123456\n" in t.text and t.answer == "123456"


def test_a_failing_or_runaway_snippet_is_an_observation_not_a_crash():
    gen = scripted({"Q": [" Code: import os\nObservation:", "Code: while True: pass\nObservation:", " 0"]})
    (t,) = act(gen, ["Q"], max_calls=2, limits=QUICK)
    assert [s.ok for s in t.steps] == [False, False] and "not allowed" in t.steps[0].observation
    assert "TimeoutError" in t.steps[1].observation and t.answer == "0"  # asked for its answer after max_calls


def test_self_consistent_actions_keep_the_observation_most_candidates_agree_on():
    cands = [" Code: print(2 + 2)\nObservation:", " Code: print(5)\nObservation:", " Code: print(4)\nObservation:",
             " Code: 1/0\nObservation:"]  # fmt: skip
    gen = scripted({"Q": cands + ["Answer: 4"] * 4})
    (t,) = act(gen, ["Q"], max_calls=1, samples=4, limits=QUICK)
    assert t.tool_calls == 1 and t.steps[0].observation == "4" and t.steps[0].code == "print(2 + 2)"


def test_an_answer_without_code_ends_the_trajectory_without_a_tool_call():
    (t,) = act(scripted({"Q": [" Thought: easy\nAnswer: 7"]}), ["Q"], max_calls=3, limits=QUICK)
    assert t.tool_calls == 0 and t.answer == "7"


@pytest.mark.parametrize("text", ["Code: x = 3; y = 4; print(x * y)\n", "Thought: t\nCode: print(12)\nObservation:"])
def test_code_is_read_from_the_last_code_line(text):
    assert code_of(text) in ("x = 3\ny = 4\nprint(x * y)", "print(12)")
