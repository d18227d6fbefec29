"""Selection strategies for LM teacher samples.

Each maps one part of teacher data (all samples of its prompts: parts are written
prompt-major) to (keep mask, weight, reason) per row. ``LM_SELECTORS`` is the table;
``chained`` applies several in turn (``--by majority+dedup``). ``majority`` votes with
``stages.lm.scoring.majority``, the vote every LM command shares.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from stages.config import SelectConfig
from stages.lm.scoring import majority as vote
from stages.tasks.reasoning import normalise


def _groups(table: pa.Table) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(table.column("prompt_id").to_pylist()):
        groups[p].append(i)
    return groups


def majority(table: pa.Table, cfg: SelectConfig):
    """Self-consistency (Wang et al. 2023): per prompt, the most frequent parsed answer
    among its samples; keep the samples that give it, weighted by its share (the
    agreement), when the share reaches ``min_agreement``."""
    raw = table.column("answer").to_pylist()
    answers = [None if a is None else normalise(a) for a in raw]
    keep = np.zeros(table.num_rows, bool)
    weight = np.zeros(table.num_rows, np.float32)
    reason = np.full(table.num_rows, "no parsed answer", dtype=object)
    for rows in _groups(table).values():
        top, count = vote(raw[i] for i in rows)
        if top is None:
            continue
        share, top = count / len(rows), normalise(top)
        for i in rows:
            agrees = answers[i] == top
            keep[i] = agrees and share >= cfg.min_agreement
            weight[i] = share
            reason[i] = f"majority {count}/{len(rows)}" if agrees else f"minority ({count}/{len(rows)} agree elsewhere)"
    return keep, weight, reason.astype(str)


def correct(table: pa.Table, cfg: SelectConfig):
    """Rejection sampling on verified answers: keep samples whose score reaches ``min_score``."""
    score = np.asarray([-1.0 if s is None else s for s in table.column("score").to_pylist()], np.float32)
    keep = score >= cfg.min_score
    return keep, np.ones(table.num_rows, np.float32), np.where(keep, "verified correct", "not verified").astype(str)


def quality(table: pa.Table, cfg: SelectConfig):
    """Keep every parsed sample, weighted by quality (QCRD-style): agreement with the
    prompt's other samples x the teacher's per-token likelihood x the verifier score
    where one exists."""
    _, agreement, _ = majority(table, cfg)
    answers = table.column("answer").to_pylist()
    n_tok = np.asarray([max(len(t), 1) for t in table.column("token_ids").to_pylist()], np.float32)
    likelihood = np.exp(np.asarray(table.column("seq_logprob").to_pylist(), np.float32) / n_tok)
    score = np.asarray([1.0 if s is None else s for s in table.column("score").to_pylist()], np.float32)
    weight = (agreement * likelihood * score).astype(np.float32)
    keep = np.asarray([a is not None for a in answers]) & (weight > 0)
    return keep, weight, np.where(keep, "quality-weighted", "unparsed or zero quality").astype(str)


def dedup(table: pa.Table, cfg: SelectConfig):
    """Drop exact duplicates of (prompt, completion), keeping the first."""
    seen, keep = set(), np.zeros(table.num_rows, bool)
    for i, key in enumerate(zip(table.column("prompt").to_pylist(), table.column("completion").to_pylist(), strict=True)):
        keep[i] = key not in seen
        seen.add(key)
    return keep, np.ones(table.num_rows, np.float32), np.where(keep, "first copy", "duplicate").astype(str)


def length(table: pa.Table, cfg: SelectConfig):
    """Keep completions of ``min_tokens`` to ``max_tokens`` tokens."""
    n = np.asarray([len(t) for t in table.column("token_ids").to_pylist()])
    keep = (n >= cfg.min_tokens) & (n <= cfg.max_tokens)
    return keep, np.ones(table.num_rows, np.float32), np.where(keep, "length ok", "too short or too long").astype(str)


LM_SELECTORS = {"majority": majority, "correct": correct, "quality": quality, "dedup": dedup, "length": length}


def chained(names: list[str], table: pa.Table, cfg: SelectConfig):
    """Each selector in turn on the rows the previous ones kept: a row survives all of them,
    its weight is the product of theirs, and its reason is that of the last one to judge it."""
    keep = np.ones(table.num_rows, bool)
    weight = np.ones(table.num_rows, np.float32)
    reason = np.full(table.num_rows, "", dtype=object)
    for name in names:
        rows = np.flatnonzero(keep)
        k, w, r = LM_SELECTORS[name](table.take(pa.array(rows)), cfg)
        keep[rows], reason[rows] = k, r
        weight[rows] *= np.asarray(w, np.float32)
    return keep, weight, reason.astype(str)
