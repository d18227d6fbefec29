"""Token alignment across two tokenizers by character offsets, for cross-tokenizer distillation.

Both sides are reduced to what each token covers of one decoded text: the teacher's stored ids
by decoding them piece by piece (``decoded_spans``), the student's tokenisation of that text by
its offset mapping (``offset_spans``). Token strings ("▁", "Ġ", "<0xE2>") are never compared,
so SentencePiece, byte-level BPE and byte fallback all look alike here. ``align`` then groups
the two token runs into the minimal spans whose boundaries coincide on both sides (the rule of
GOLD's byte-offset alignment and of the span alignment in DSKD / MinED: advance the side that
ends first until both end at the same character). ``vocabulary_map`` pairs the tokens of two
vocabularies whose decoded strings match one to one (GOLD / ULD's "exact string match").

A side is a ``Pieces``: per token the character where its coverage ends (non-decreasing) and
whether it is glued to the token before it, i.e. may not start a span: the later bytes of a
character split over several tokens (overlapping offsets, or a partial UTF-8 sequence that only
the next token completes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.errors import DistilError

REPLACEMENT = "\ufffd"
"""What a decoder prints for an incomplete UTF-8 sequence (a byte token waiting for the rest)."""


@dataclass(frozen=True)
class Pieces:
    ends: list[int]
    """per token, the character its coverage ends at; token i covers text[ends[i-1]:ends[i]]"""
    glued: list[bool]
    """per token, True when it continues the character of the token before (no span starts there)"""


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decoded_spans(tokenizer, ids: list[int]) -> tuple[str, Pieces]:
    """(text, pieces) of ``ids`` decoded with ``tokenizer``, special tokens dropped.

    Decoded incrementally as streaming detokenisers do (vLLM's ``detokenize_incrementally``):
    each token's text is the growth of the decoding of a short window that starts one emitted
    token back, so a SentencePiece decoder's start-of-text rules apply only at the true start. A
    token whose decoding ends in an incomplete character (or prints nothing) covers no
    characters; the token that completes it covers the whole character and is glued to it.
    If the pieces do not add up to the full decoding the exact quadratic form (prefix by prefix)
    is used instead."""
    text = _decode(tokenizer, list(ids))
    ends, glued, pieces = [], [], []
    prefix = read = pos = 0
    for i in range(len(ids)):
        old, new = _decode(tokenizer, ids[prefix:read]), _decode(tokenizer, ids[prefix : i + 1])
        glued.append(read < i)  # tokens read..i-1 printed nothing yet: i completes their character
        if len(new) > len(old) and new.startswith(old) and not new.endswith(REPLACEMENT):
            pieces.append(new[len(old) :])
            pos += len(pieces[-1])
            prefix, read = read, i + 1
        ends.append(pos)
    if "".join(pieces) != text[:pos]:
        return text, _prefix_spans(tokenizer, ids, text)
    if ends:
        ends[-1] = len(text)  # a trailing incomplete sequence (or a real U+FFFD) goes to the last token
    return text, Pieces(ends, glued)


def _prefix_spans(tokenizer, ids: list[int], text: str) -> Pieces:
    """Token i ends where the decoding of ids[:i+1] stops matching ``text`` (O(n^2) decodes)."""
    ends, glued, pos, pending = [], [], 0, False
    for i in range(len(ids)):
        glued.append(pending)
        prefix = _decode(tokenizer, ids[: i + 1])
        grew = len(prefix) > pos and text.startswith(prefix) and not prefix.endswith(REPLACEMENT)
        pos = len(prefix) if grew else pos
        pending = not grew
        ends.append(pos)
    if ends:
        ends[-1] = len(text)
    return Pieces(ends, glued)


def offset_spans(tokenizer, text: str) -> tuple[list[int], Pieces]:
    """(ids, pieces) of ``text`` tokenised by ``tokenizer`` (no special tokens), from its offset
    mapping: a token whose offsets start before the previous token's end is glued to it (bytes of
    one character), characters no token claims (trimmed whitespace) go to the next token."""
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError(f"cross-tokenizer alignment needs a fast tokenizer (offsets), got {type(tokenizer).__name__}")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ends, glued, pos = [], [], 0
    for start, end in enc["offset_mapping"]:
        glued.append(bool(ends) and start < pos)
        pos = max(pos, end)
        ends.append(pos)
    if ends:
        ends[-1] = len(text)
    elif text:
        raise DistilError(f"the student's tokenizer gives no tokens for the text {text[:40]!r}")
    return list(enc["input_ids"]), Pieces(ends, glued)


def align(teacher: Pieces, student: Pieces) -> list[tuple[list[int], list[int]]]:
    """The aligned spans of two tokenisations of one text: per span (teacher positions, student
    positions), both runs contiguous, in order, together covering every token once.

    A span closes at the first character where both runs end, neither side's next token is glued
    to its last, and both runs cover at least one character; so zero-width tokens (special tokens,
    bytes waiting for the rest of a character) join the span that follows them. Zero-width tokens
    left over at the end join the last span. Raises when the two sides do not cover the same text.
    """
    t_ends, t_glued, s_ends, s_glued = teacher.ends, teacher.glued, student.ends, student.glued
    nt, ns = len(t_ends), len(s_ends)
    spans, i, j, start = [], 0, 0, 0
    while i < nt and j < ns:
        ti, sj = i, j
        te, se = t_ends[i], s_ends[j]
        i, j = i + 1, j + 1
        while True:
            if i < nt and (t_glued[i] or te < se or te == start):
                te, i = t_ends[i], i + 1
            elif j < ns and (s_glued[j] or se < te or se == start):
                se, j = s_ends[j], j + 1
            else:
                break
        if te != se:
            raise DistilError(f"the teacher's and the student's tokens cover different text (at characters {te} and {se})")
        spans.append((list(range(ti, i)), list(range(sj, j))))
        start = te
    rest_t, rest_s = list(range(i, nt)), list(range(j, ns))
    if any(t_ends[p] != start for p in rest_t) or any(s_ends[p] != start for p in rest_s):
        raise DistilError("the teacher's and the student's tokens cover different text (one side ends early)")
    if rest_t or rest_s:
        if not spans:
            return [(rest_t, rest_s)]
        spans[-1] = (spans[-1][0] + rest_t, spans[-1][1] + rest_s)
    return spans


def _token_strings(tokenizer) -> list[str | None]:
    """Each id's decoded string, or None where it is no text of its own: special tokens, empty
    or incomplete pieces. Each id is decoded after a fixed anchor token and the anchor's own text
    removed, so a decoder that drops the leading space of a text's first token (SentencePiece)
    still shows the space a token carries mid-text."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    base = _decode(tokenizer, anchor)
    size = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    batch = [anchor + [i] for i in range(size)]
    if backend is not None:
        texts = backend.decode_batch(batch, skip_special_tokens=False)
    else:
        texts = tokenizer.batch_decode(batch, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for i, t in enumerate(texts):
        piece = t[len(base) :] if t.startswith(base) else None
        out.append(None if i in special or not piece or REPLACEMENT in piece else piece)
    return out


def _string_ids(tokenizer, strings: list[str | None]) -> dict[str, int]:
    """Each decoded string -> its one id. A string several ids decode to (a byte-fallback token
    beside the same character's own token) keeps the id the tokenizer itself gives that string,
    or none if that is not one of them."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strings):
        if s is not None:
            groups.setdefault(s, []).append(i)
    out = {}
    for s, ids in groups.items():
        if len(ids) > 1:
            own = tokenizer(s, add_special_tokens=False)["input_ids"]
            ids = own if len(own) == 1 and own[0] in ids else []
        if ids:
            out[s] = ids[0]
    return out


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """``[len(teacher vocabulary)]`` int64: the student id whose decoded string equals the teacher
    id's, where that string names one token in each vocabulary (``_string_ids``); -1 elsewhere."""
    s_ids = _string_ids(student_tokenizer, _token_strings(student_tokenizer))
    mapping = np.full(len(teacher_tokenizer), -1, dtype=np.int64)
    for s, t in _string_ids(teacher_tokenizer, _token_strings(teacher_tokenizer)).items():
        if s in s_ids:
            mapping[t] = s_ids[s]
    return mapping
