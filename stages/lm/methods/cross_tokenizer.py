"""The loss of the cross-tokenizer LM methods (``uld``, ``span-kd``): a student whose tokenizer is
not the teacher's learns from the top-k log-probs stored in LM teacher data, compared on the
spans where the two tokenisations of the completion align (``stages.lm.alignment``), mixed with
next-token cross-entropy on the student's own tokens of the same text (``alpha``).

``encode_cross`` turns a teacher-data row into the tuple ``stages.lm.training.collate`` takes:
the student's ids and labels (its tokens of the teacher's decoded completion, then its eos where
the teacher stopped), and per student completion token a row of ``k + 3`` ids and ``k + 3``
log-probs that ``collate`` places, like a same-tokenizer top-k, at the position predicting that
token. Only a span's first student token carries data:

- ids ``[0:k]``: the teacher's top-k at the span's first teacher token mapped to student ids by
  exact decoded string (``alignment.vocabulary_map``), -1 where unmapped, where it is the
  span's own token, or where the span is longer than one token on either side;
- ids ``[k]``: the span's number in the row (1, 2, ...; 0 = no span) on all its student tokens;
  ``[k + 1]``: ``FIRST`` on its first student token, ``LATER`` on the others;
  ``[k + 2]``: flags ``SINGLE`` (one token on each side) | ``KNOWN`` (every teacher token of the
  span is in its stored top-k, so the teacher's span log-prob is known) | ``LATER_KNOWN`` (the
  same for the span's later teacher tokens: always so for a one-token teacher run);
- log-probs ``[0:k]``: the teacher's top-k there; ``[k]``: the teacher's log-prob of the span's
  later tokens; ``[k + 1]``: of the whole span.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stages.config import DistillConfig
from stages.errors import DistilError
from stages.lm.alignment import align, decoded_spans, offset_spans, vocabulary_map
from stages.lm.topk_codec import TopKFormat
from stages.lm.training import IGNORE, token_ce
from stages.losses.cross_tokenizer import CROSS_TOKENIZER, span_kl, uld

FIRST, LATER = 1, 2
SINGLE, KNOWN, LATER_KNOWN = 1, 2, 4
EXTRA = 3
"""Columns after the k top-k columns: span number, role, flags."""


def cross_encoder(teacher_tokenizer, student_tokenizer, max_len: int, k: int, *, topk: TopKFormat | None = None):
    """``encode_row(raw row)`` for ``fit``: ``encode_cross`` with the vocabulary map built once."""
    mapping = vocabulary_map(teacher_tokenizer, student_tokenizer)

    def encode_row(r: dict) -> tuple:
        return encode_cross(teacher_tokenizer, student_tokenizer, r, max_len, k=k, mapping=mapping, topk=topk)

    return encode_row


def encode_cross(teacher_tokenizer, student_tokenizer, row: dict, max_len: int, *, k: int, mapping=None,
                 topk: TopKFormat | None = None) -> tuple:  # fmt: skip
    """(ids, labels, packed ids [n, k + 3], packed log-probs [n, k + 3], weight) of one teacher-data
    row for a student with its own tokenizer; n = its completion tokens, cut after the last aligned
    span that fits ``max_len``. The text is the teacher's ids decoded (special tokens dropped), so
    both sides cover exactly the same characters. ``topk`` (default: format 1, ``k`` per token)
    decodes the row's stored top-k."""
    t_ids = [int(t) for t in row["token_ids"]]
    n = len(t_ids)
    if n == 0:
        raise DistilError("a teacher-data row has no tokens; cross-tokenizer methods need the teacher's token ids and top-k: "
                          "regenerate the teacher data")  # fmt: skip
    top_ids, top_lp, _ = (topk or TopKFormat(k)).row(row)
    mapping = vocabulary_map(teacher_tokenizer, student_tokenizer) if mapping is None else mapping
    ended = t_ids[-1] == teacher_tokenizer.eos_token_id
    text, t_pieces = decoded_spans(teacher_tokenizer, t_ids[: n - ended])
    s_ids, s_pieces = offset_spans(student_tokenizer, text)
    spans = align(t_pieces, s_pieces)
    if ended and student_tokenizer.eos_token_id is not None:  # the two end-of-sequence tokens are one span: both stop here
        spans.append(([n - 1], [len(s_ids)]))
        s_ids = s_ids + [student_tokenizer.eos_token_id]
    prompt = student_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    if len(prompt) + 1 >= max_len:
        raise DistilError(f"a prompt is {len(prompt)} tokens, longer than the context of {max_len}; raise lm.context")
    budget = max_len - len(prompt)
    spans = [s for s in spans if s[1] and max(s[1]) < budget]
    completion = s_ids[: spans[-1][1][-1] + 1] if spans else s_ids[:budget]
    if not completion:  # the teacher printed nothing (special tokens only): nothing to align, only an end to learn
        completion = [student_tokenizer.eos_token_id]
    packed_ids, packed_lp = _pack(spans, t_ids, top_ids, top_lp, completion, mapping, k)
    return prompt + completion, [IGNORE] * len(prompt) + completion, packed_ids, packed_lp, row.get("weight", 1.0)


def _pack(spans, t_ids, top_ids, top_lp, s_ids, mapping, k):
    """The per-student-token rows of the module docstring's layout."""
    hit = top_ids == np.asarray(t_ids)[:, None]
    actual = np.where(hit.any(1), top_lp[np.arange(len(t_ids)), hit.argmax(1)], np.nan)  # teacher log-prob of its token
    mapped = np.where(top_ids < len(mapping), mapping[np.minimum(top_ids, len(mapping) - 1)], -1)
    ids = np.zeros((len(s_ids), k + EXTRA), np.int64)
    lp = np.zeros((len(s_ids), k + EXTRA), np.float32)
    for g, (tp, sp) in enumerate(spans, 1):
        if not tp:
            continue
        first_t, first_s = tp[0], sp[0]
        span_lp, later_lp, single = float(actual[tp].sum()), float(actual[tp[1:]].sum()), len(tp) == 1 and len(sp) == 1
        known, later_known = bool(np.isfinite(span_lp)), bool(np.isfinite(later_lp))
        ids[sp, k], ids[sp, k + 1] = g, LATER
        ids[first_s, k + 1], ids[first_s, k + 2] = FIRST, SINGLE * single + KNOWN * known + LATER_KNOWN * later_known
        alt = mapped[first_t].copy()
        if single:
            alt[(top_ids[first_t] == t_ids[first_t]) | (alt == s_ids[first_s])] = -1
        else:
            alt[:] = -1
        ids[first_s, :k] = alt
        lp[first_s, :k] = top_lp[first_t]
        lp[first_s, k], lp[first_s, k + 1] = later_lp if later_known else 0.0, span_lp if known else 0.0
    return ids, lp


def cross_tokenizer_loss(method_name: str, cfg: DistillConfig):
    """``loss(model, batch)``: ``alpha`` x the method's loss of ``CROSS_TOKENIZER`` on the aligned
    spans (rows weighted by ``w``) plus ``1 - alpha`` x next-token CE on the student's tokens.
    ``uld`` compares each span's first-token distributions, merged over the span (GOLD) and
    tempered by ``temperature``; ``span-kd`` the span log-probs and the mapped alternatives."""
    if method_name not in CROSS_TOKENIZER:
        raise DistilError(f"'{method_name}' is no cross-tokenizer method; choose one of {', '.join(CROSS_TOKENIZER)}")

    def loss(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        distil = span_terms(method_name, logits, b, cfg.temperature)
        if cfg.alpha >= 1:
            return distil
        return cfg.alpha * distil + (1 - cfg.alpha) * token_ce(logits, b["labels"], b["w"])

    return loss


def span_terms(method_name: str, logits: torch.Tensor, b: dict, temperature: float = 1.0) -> torch.Tensor:
    """The distillation term alone, from the student's ``logits`` [B, T, V] and a collated batch."""
    ids, lp = b["t_ids"][:, :-1], b["t_logprobs"][:, :-1]  # logits[t] predicts token t + 1
    k = ids.shape[-1] - EXTRA
    span_no, role, flags = ids[..., k], ids[..., k + 1], ids[..., k + 2]
    logits = logits[:, :-1]
    target = b["labels"][:, 1:]
    # the student's log-prob of each of its own tokens, summed per span (span 0 gathers the rest)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.clamp_min(0).reshape(-1), reduction="none")
    tok = -flat.view(target.shape) * (role > 0)
    sums = torch.zeros(tok.shape[0], int(span_no.max()) + 1, dtype=tok.dtype, device=tok.device).scatter_add(1, span_no, tok)
    first = role == FIRST
    s_span, s_first = sums.gather(1, span_no)[first], tok[first]
    known, single, later_known = ((flags[first] & f) > 0 for f in (KNOWN, SINGLE, LATER_KNOWN))
    t_first = lp[first]
    weight = b["w"][:, None].expand_as(role)[first]
    if method_name == "uld":
        return uld(logits[first], t_first[:, :k], student_shift=s_span - s_first, teacher_shift=t_first[:, k],
                   temperature=temperature, mask=later_known, weight=weight)  # fmt: skip
    alt = ids[first][:, :k]
    s_alt = F.log_softmax(logits[first].float(), dim=-1).gather(-1, alt.clamp_min(0))
    valid = torch.cat([known[:, None], (alt >= 0) & single[:, None]], dim=1)
    s_b = torch.cat([s_span[:, None], s_alt], dim=1)
    t_b = torch.cat([t_first[:, k + 1 : k + 2], t_first[:, :k]], dim=1)
    return span_kl(s_b, t_b, valid, mask=valid.any(1), weight=weight)
