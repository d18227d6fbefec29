"""Cross-tokenizer distillation losses as pure tensor functions: the teacher and the student
split the text differently, so their distributions are compared on aligned spans
(``stages.lm.alignment``) rather than token by token, and the teacher is the sparse top-k
stored in LM teacher data.

- ``uld``: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030, section 3):
  the Wasserstein-1 distance between the two next-token distributions under a uniform transport
  cost, whose closed form is the L1 distance between the probability vectors sorted in
  decreasing order, the shorter vocabulary padded with zeros.
- ``span_kl``: a KL over "buckets", events that mean the same text for both models (the aligned
  span itself; at one-token spans also the teacher's top-k alternatives whose decoded strings map
  one-to-one to student tokens), each model's remaining mass in one "other" bucket.

Both take the span merging of GOLD (TRL's ``GOLDTrainer``, "Unlocking On-Policy Distillation for
Any Model Family", Hugging Face 2025; ``ULDLoss._merge_probabilities_with_alignment_groups``):
a span of several tokens has the probability of its actual tokens by the chain rule,
``P(span | x) = P(y_1 | x) prod_{j>1} P(y_j | y_<j, x)``; for ULD the whole first-token
distribution is scaled by the continuation's probability ``prod_{j>1} P(y_j | ...)``.

Every function returns the weighted mean over counted spans (``mask``, ``weight`` as in
``stages.losses.logits.reduce``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.losses.logits import _kl, _log1mexp, _wide, reduce

FLOOR = -1e4
"""Log-mass of a bucket that does not count: exp() underflows to exactly 0 in float32, and,
unlike -inf, it keeps every gradient finite."""


def _with_other(logp: torch.Tensor) -> torch.Tensor:
    """``[..., B]`` bucket log-masses -> ``[..., B + 1]`` with the remaining mass appended."""
    return torch.cat([logp, _log1mexp(torch.logsumexp(logp, -1, keepdim=True))], dim=-1)


def uld(student_logits, teacher_logprobs, *, student_shift=None, teacher_shift=None, temperature=1.0, mask=None,
        weight=None):  # fmt: skip
    """ULD from a stored top-k teacher, per aligned span:
    ``sum_{r<=k} |c_s p_s(r) - c_t p_t(r)| + |c_s o_s - c_t o_t|``.

    - ``student_logits``: ``[N, V_s]`` the student's logits at each span's first token;
    - ``teacher_logprobs``: ``[N, k]`` the teacher's stored top-k log-probs there (sorted or not);
    - ``student_shift`` / ``teacher_shift``: optional ``[N]`` log-probability of the span's
      remaining actual tokens, ``log c`` (GOLD's merge; 0 = a one-token side);
    - ``p(r)``: the r-th largest probability, ``o = 1 - sum_{r<=k} p(r)`` the rest.

    Approximation: the teacher's ranks beyond k are unknown, so ranks k+1.. of both sides are
    one bucket each. By the triangle inequality this is a lower bound of the paper's full sum
    over all ranks, equal to it when k covers both vocabularies; it is zero exactly when the top-k
    and the remaining masses agree. ``temperature`` (the paper's tau) divides both sides' k+1
    bucket log-masses and renormalises, as the sparse divergences of ``stages.losses.logits`` do.
    """
    k = teacher_logprobs.shape[-1]
    s_full = F.log_softmax(_wide(student_logits), dim=-1)
    s_top = s_full.topk(min(k, s_full.shape[-1]), dim=-1).values
    if s_top.shape[-1] < k:  # a student vocabulary smaller than k: its missing ranks hold 0
        s_top = F.pad(s_top, (0, k - s_top.shape[-1]), value=FLOOR)
    s = _with_other(s_top)
    t = _with_other(_wide(teacher_logprobs).sort(dim=-1, descending=True).values)
    if temperature != 1.0:
        s, t = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    if student_shift is not None:
        s = s + student_shift.to(s.dtype)[:, None]
    if teacher_shift is not None:
        t = t + teacher_shift.to(t.dtype)[:, None]
    return reduce((s.exp() - t.exp()).abs().sum(-1), mask, weight)


def span_kl(student_logp, teacher_logp, valid, *, mask=None, weight=None):
    """``KL(p_t || p_s)`` over the counted buckets of each aligned span plus one "other" bucket.

    - ``student_logp`` / ``teacher_logp``: ``[N, B]`` log-probability of each bucket under each
      model: column 0 is the span itself (the chain-rule log-probability of the model's own
      tokens of the span); the other columns are alternative single tokens whose decoded string
      is the same for both (at spans one token long on both sides);
    - ``valid``: ``[N, B]`` bool, the buckets that count (unknown teacher log-probs, unmapped ids
      and padding do not); a span with no valid bucket should be masked out.

    With only column 0 this is the Bernoulli KL of the event "the next text is this span",
    ``p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))``; with k alternatives it is the
    top-k "other"-bucket KL of the sparse divergences (FIRST) on the vocabulary the two tokenizers
    share by exact decoded string (the vocabulary mapping of GOLD's hybrid ULD).
    """
    s = _with_other(_wide(student_logp).masked_fill(~valid, FLOOR))
    t = _with_other(_wide(teacher_logp).masked_fill(~valid, FLOOR))
    return reduce(_kl(t, s), mask, weight)


CROSS_TOKENIZER = {"uld": uld, "span-kd": span_kl}
"""The cross-tokenizer losses by the method name ``distil distill --method`` takes."""
