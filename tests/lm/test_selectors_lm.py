"""LM selection strategies on a hand-built part of teacher samples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages.artifacts import LM_TEACHER_DATA
from stages.config import SelectConfig
from stages.lm.selectors import LM_SELECTORS


def part(answers, scores, prompt_ids, completions=None, tokens=None):
    n = len(answers)
    completions = completions or [f" {a}" for a in answers]
    tokens = tokens or [[1, 2]] * n
    return pa.Table.from_pylist(
        [
            {"id": i, "prompt_id": prompt_ids[i], "sample": i, "split": "train", "task": "t", "item": 0, "prompt": f"p{prompt_ids[i]}",
             "gold": "4", "completion": completions[i], "answer": answers[i], "parse": "ok" if answers[i] else "empty completion",
             "score": scores[i], "seq_logprob": -1.0, "token_ids": tokens[i], "topk_ids": [], "topk_logprobs": np.zeros(0, np.float16)}
            for i in range(n)
        ],
        schema=LM_TEACHER_DATA,
    )  # fmt: skip


def test_majority_keeps_the_agreeing_samples_weighted_by_agreement():
    t = part(["4", "4", "5", None, "7", "7"], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1])
    keep, weight, reason = LM_SELECTORS["majority"](t, SelectConfig(by="majority"))
    assert keep.tolist() == [True, True, False, False, True, True]
    assert weight.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    assert reason[0] == "majority 2/4" and reason[2].startswith("minority")
    keep, _, _ = LM_SELECTORS["majority"](t, SelectConfig(by="majority", min_agreement=0.75))
    assert keep.tolist() == [False, False, False, False, True, True]


def test_correct_dedup_length_quality():
    t = part(["4", "5", "4", None], [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0], completions=[" 4", " 5", " 4", ""],
             tokens=[[1], [1, 2], [1], [1, 2, 3, 4]])  # fmt: skip
    assert LM_SELECTORS["correct"](t, SelectConfig())[0].tolist() == [True, False, True, False]
    assert LM_SELECTORS["dedup"](t, SelectConfig())[0].tolist() == [True, True, False, True]
    assert LM_SELECTORS["length"](t, SelectConfig(min_tokens=2, max_tokens=3))[0].tolist() == [False, True, False, False]
    keep, weight, _ = LM_SELECTORS["quality"](t, SelectConfig())
    assert keep.tolist() == [True, False, True, False] and weight[0] > 0 and weight[1] == 0


def test_chained_selectors_keep_one_copy_of_the_majority_answer():
    from stages.lm.selectors import chained

    t = part(["4", "4", "5", "4", "7", "7"], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1])
    keep, weight, reason = chained(["majority", "dedup"], t, SelectConfig())
    assert keep.tolist() == [True, False, False, False, True, False]
    assert weight[0] == pytest.approx(0.75) and weight[4] == pytest.approx(1.0)
    assert reason[1] == "duplicate" and reason[2].startswith("minority")
