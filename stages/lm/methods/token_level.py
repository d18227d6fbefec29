"""The loss of the token-level LM methods (``kd``, ``reverse-kl``, ``jsd``, ``skew-kl``,
``tvd``, ``tsd``, ``mst``): the method's divergence of ``stages.losses`` against the top-k
teacher log-probs stored in LM teacher data, mixed with next-token cross-entropy, and TSD-KD's
token selection.

The sparse divergences read k ids and log-probs per token plus one "other" bucket, never a
full-vocabulary distribution (FIRST's "concentrated knowledge"). With ``lm.loss_chunk`` > 0 the
student side is fused (``stages.losses.fused``): output layer, one log-softmax, CE and the
divergence on the completion tokens only, a chunk at a time; the same loss and gradients.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.lm.methods import LMMethod
from stages.lm.training import IGNORE, token_ce
from stages.losses import DIVERGENCES, divergence_hyper
from stages.losses.fused import final_hidden, fused_top_k, output_layer


def top_k_loss(method: LMMethod, cfg: DistillConfig):
    """``loss(model, batch)``: ``alpha`` x the method's divergence between the student and the
    stored top-k teacher distribution on the completion tokens (rows weighted by ``w``), plus
    ``1 - alpha`` x next-token CE; for a ``selective`` method (tsd) only on the tokens
    ``_token_selection`` keeps, plus its entropy penalty."""
    divergence, hyper = DIVERGENCES[method.divergence], divergence_hyper(method.divergence, cfg)

    def loss(m, b):
        layer = output_layer(m) if cfg.lm.loss_chunk > 0 else None
        mask = b["labels"][:, 1:] != IGNORE  # logits[t] predicts token t + 1; the teacher's top-k sits at t
        teacher = (b["t_ids"][:, :-1], b["t_logprobs"][:, :-1])
        row_w = b["w"][:, None].expand_as(mask)
        if layer is not None:
            hidden, head = final_hidden(m, layer, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            select = _chunk_selection(cfg, mask.sum().clamp_min(1)) if method.selective else None
            return fused_top_k(hidden[:, :-1], head, mask, b["labels"][:, 1:], teacher, divergence, hyper=hyper, weight=row_w,
                               alpha=cfg.alpha, chunk=cfg.lm.loss_chunk, select=select)  # fmt: skip
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        extra = 0.0
        if method.selective:
            mask, extra = _token_selection(logits[:, :-1], teacher, mask, cfg)
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
    s_logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    selected, entropy = _selection(s_logp, s_logp.gather(-1, ids[..., :1]).squeeze(-1), logp[..., 0], mask, cfg.tsd_margin)
    return selected, cfg.tsd_entropy * entropy / mask.sum().clamp_min(1)


def _selection(s_logp, s_on_top, t_top, mask, margin: float):
    """(the tokens of ``mask`` TSD-KD keeps, the student's entropy summed over ``mask``) from the
    student's log-probs [..., V], its log-prob of the teacher's top-1 [...] and the teacher's
    top-1 log-prob [...] (stored top-k is sorted: index 0 is the teacher's top-1)."""
    selected = mask & (t_top.exp() - s_on_top.exp().detach() > margin)
    entropy = -(s_logp.exp() * s_logp).sum(-1)
    return selected, (entropy * mask).sum()


def _chunk_selection(cfg, count: torch.Tensor):
    """``_token_selection`` for one chunk of the fused loss (``stages.losses.fused.Select``): every
    row of a chunk is a completion token; the entropy term is divided by the batch's ``count`` of them."""

    def select(s_logp, s_top, t_lp):
        every = torch.ones(s_top.shape[0], dtype=torch.bool, device=s_top.device)
        selected, entropy = _selection(s_logp, s_top[:, 0], t_lp[:, 0], every, cfg.tsd_margin)
        return selected, cfg.tsd_entropy * entropy / count

    return select
