"""The loss of the token-level LM methods (``kd``, ``reverse-kl``, ``jsd``, ``skew-kl``,
``tvd``, ``tsd``, ``mst``): the method's divergence of ``stages.losses`` against the top-k
teacher log-probs stored in LM teacher data, mixed with next-token cross-entropy, and TSD-KD's
token selection.

The sparse divergences read k ids and log-probs per token plus one "other" bucket, never a
full-vocabulary distribution (FIRST's "concentrated knowledge").
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.lm.methods import LMMethod
from stages.lm.training import IGNORE, token_ce
from stages.losses import DIVERGENCES, divergence_hyper


def top_k_loss(method: LMMethod, cfg: DistillConfig):
    """``loss(model, batch)``: ``alpha`` x the method's divergence between the student and the
    stored top-k teacher distribution on the completion tokens (rows weighted by ``w``), plus
    ``1 - alpha`` x next-token CE; for a ``selective`` method (tsd) only on the tokens
    ``_token_selection`` keeps, plus its entropy penalty."""
    divergence, hyper = DIVERGENCES[method.divergence], divergence_hyper(method.divergence, cfg)

    def loss(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        mask = b["labels"][:, 1:] != IGNORE  # logits[t] predicts token t + 1; the teacher's top-k sits at t
        teacher = (b["t_ids"][:, :-1], b["t_logprobs"][:, :-1])
        extra = 0.0
        if method.selective:
            mask, extra = _token_selection(logits[:, :-1], teacher, mask, cfg)
        row_w = b["w"][:, None].expand_as(mask)
        distil = divergence(logits[:, :-1], teacher, mask=mask, weight=row_w, **hyper) + extra
        if cfg.alpha >= 1:
            return distil
        return cfg.alpha * distil + (1 - cfg.alpha) * token_ce(logits, b["labels"], b["w"])

    return loss


def _token_selection(logits, teacher, mask, cfg):
    """TSD-KD's direct distillation (Explain in Your Own Words, section 3.2): keep only the
    tokens where the teacher's top-1 probability exceeds the student's probability of that
    token by more than ``tsd_margin`` (relative confidence), and add ``tsd_entropy`` times
    the student's mean entropy on completion tokens, which keeps the student confident.
    The indirect (re-ranking) half of TSD-KD needs a live teacher and is not part of this."""
    ids, logp = teacher
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    t_top = logp[..., 0].exp()  # stored top-k is sorted: index 0 is the teacher's top-1
    s_on_top = s_logp.gather(-1, ids[..., :1]).squeeze(-1).exp()
    selected = mask & (t_top - s_on_top.detach() > cfg.tsd_margin)
    entropy = -(s_logp.exp() * s_logp).sum(-1)
    penalty = cfg.tsd_entropy * (entropy * mask).sum() / mask.sum().clamp_min(1)
    return selected, penalty
