"""Tokens of a served answer: one record per token with its log-probs, the text each token
adds (for ``text_offset`` and streaming), and the cut at a stop string.

Log-probs of generated tokens come from the engine's stored top-k when the chosen token is
among them (always so when greedy, since the top-1 is asked for); otherwise ``app`` scores
the completion with ``engine.score``. Log-probs are floats: -inf is sent as -9999.0, as vLLM
does, because JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.lm.teachers.base import Completion, Scored

FLOOR = -9999.0


@dataclass
class Token:
    """One token: its id, log-prob (None for a prompt's first token) and top-k (id, log-prob)
    pairs, sorted (None for a prompt's first token)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def _lp(value) -> float:
    value = float(value)
    return FLOOR if not np.isfinite(value) else max(value, FLOOR)


def from_completion(row: Completion, count: int, k: int) -> list[Token] | None:
    """The first ``count`` generated tokens of ``row`` with their top ``k``, from the engine's
    stored top-k; None when a chosen token is not among them (a sampled rare token, or no top-k)."""
    ids, kk = row.token_ids or [], row.k
    out = []
    for t, tid in enumerate(ids[:count]):
        top_ids = [int(i) for i in row.topk_ids[t * kk : (t + 1) * kk]]
        top_lp = row.topk_logprobs[t * kk : (t + 1) * kk]
        if tid not in top_ids:
            return None
        out.append(
            Token(int(tid), _lp(top_lp[top_ids.index(tid)]), [(i, _lp(v)) for i, v in zip(top_ids[:k], top_lp[:k], strict=True)])
        )
    return out


def from_scored(ids: list[int], scored: Scored, k: int) -> list[Token]:
    """Tokens ``ids`` with the log-probs ``engine.score`` gave them."""
    return [
        Token(
            int(tid),
            _lp(scored.logprobs[t]),
            [(int(i), _lp(v)) for i, v in zip(scored.topk_ids[t][:k], scored.topk_logprobs[t][:k], strict=True)],
        )
        for t, tid in enumerate(ids)
    ]


def pieces(tokenizer, ids: list[int], text: str, *, skip_special: bool) -> list[str]:
    """The text each token adds, so that ``"".join(pieces) == text``. Incremental decoding as
    Hugging Face TGI does it (a window from the previous token on, so a SentencePiece word keeps
    its leading space, and a token ending inside a multi-byte character adds "" until the
    character is whole), clipped to ``text``."""
    if not ids:
        return [text] if text else []
    bounds, prefix, read, end = [], 0, 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special)
        after = tokenizer.decode(ids[prefix : i + 1], skip_special_tokens=skip_special)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            end += len(after) - len(before)
            prefix, read = read, i + 1
        bounds.append(min(end, len(text)))
    bounds[-1] = len(text)
    starts = [0, *bounds[:-1]]
    return [text[a:b] for a, b in zip(starts, bounds, strict=True)]


def cut_at_stop(text: str, parts: list[str], stops: list[str]) -> tuple[str, list[str]] | None:
    """(text before the first stop string, the pieces of the tokens that wrote it, the last
    one clipped), or None when no stop string occurs. Tokens that only wrote the stop string
    are dropped, so ``len(pieces)`` is the completion's token count."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not found:
        return None
    pos, kept, start = min(found), [], 0
    for piece in parts:
        if start >= pos:
            break
        kept.append(piece[: pos - start])
        start += len(piece)
    return text[:pos], kept


def offsets(parts: list[str], start: int = 0) -> list[int]:
    """Where each token's text begins in the answer's text (OpenAI's ``text_offset``)."""
    out = []
    for piece in parts:
        out.append(start)
        start += len(piece)
    return out
