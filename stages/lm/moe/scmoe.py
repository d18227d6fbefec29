"""Self-Contrast Mixture-of-Experts decoding (SCMoE).

Shi et al., "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by
Self-Contrast" (NeurIPS 2024, arXiv:2405.14507; code github.com/DavidFanzz/SCMoE), Sec. 3.
One MoE model is run twice per step: the *strong* activation (its own top-k routing) gives
logits ``z_s``, the *weak* activation (every MoE layer sends each token to its rank-r expert
alone, weight 1) gives ``z_w``. The next token is scored by

    F(x) = (1 + b) * z_s(x) - b * z_w(x)    if x in V_head
    F(x) = -inf                             otherwise
    V_head = {x : log p_s(x) >= log(alpha) + max_w log p_s(w)},   p_s = softmax(z_s)

(b = 0.5, alpha = 0.1, rank r = 2 by default). Greedy SCMoE takes argmax F; sampling draws
from softmax(F / temperature). With b = 0 the argmax is the strong model's own.

Rank r counts from 1, as the paper's "rank-k routing" does (r = 1 the router's favourite
expert, r = 2 the runner-up; the paper uses rank 2 for Mixtral). The authors' script indexes
ranks from 0, so its README's ``--student_routed_tok 2`` would be r = 3 here. Their code
contrasts raw logits and cuts on raw logits; both equal the log-softmax forms above up to a
per-row constant, so the argmax and softmax are the same. Unlike their script, EOS is not
banned (their ``early_stop=False``), so b = 0 is exactly the model's own decoding.
Qwen2-MoE's always-on shared expert is not routed and stays in the weak pass.

Integration: ``SCMoE`` is passed as ``decode=`` to ``stages.lm.generation.generate`` /
``sample``, which hand its ``SCMoELogitsProcessor`` to ``model.generate``. The processor
runs the weak pass itself, with a KV cache of its own (one extra single-token forward per
step, and a second cache in memory): about twice the decoding compute of greedy. (The weak
pass keeps the router's k columns, so the experts module still runs k expert slots per
token, k - 1 of them with weight 0: exact, but no cheaper than the strong pass.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from stages.errors import DistilError
from stages.lm.models import routers

DECODES = ("greedy", "scmoe")


def check_decode(decode: str, beta: float, alpha: float, weak_rank: int) -> None:
    """Validate the decoding settings before anything is loaded or written."""
    if decode not in DECODES:
        raise DistilError(f"unknown decode '{decode}'; choose one of {', '.join(DECODES)}")
    if not beta >= 0:
        raise DistilError(f"scmoe_beta must be >= 0 (0 = the model's own decoding), got {beta}")
    if not 0 < alpha <= 1:
        raise DistilError(f"scmoe_alpha must be in (0, 1], got {alpha}")
    if weak_rank < 1:
        raise DistilError(f"scmoe_weak_rank must be >= 1 (1 = the router's top expert), got {weak_rank}")


def check_model(model, path: str | Path, weak_rank: int) -> None:
    """SCMoE needs routers, and every MoE layer needs at least ``weak_rank`` experts."""
    layers = routers(model)
    if not layers:
        raise DistilError(f"--decode scmoe needs a mixture-of-experts model; {path} has no router")
    experts = min(int(r.weight.shape[0]) for r in layers)
    if weak_rank > experts:
        raise DistilError(
            f"scmoe_weak_rank {weak_rank} does not match {path}, whose MoE layers have {experts} experts "
            f"(mismatched expert counts); choose a rank from 1 to {experts}"
        )


def contrast(strong: torch.Tensor, weak: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE scores ``(1+b) z_s - b z_w`` on V_head, -inf elsewhere.

    strong, weak: [batch, vocab] logits of the strong and weak activation. Returns [batch,
    vocab] float32. The plausibility set V_head depends on the strong model only, so the
    strong argmax is always kept and a weak model can never promote an implausible token."""
    strong, weak = strong.float(), weak.float()
    lp = torch.log_softmax(strong, dim=-1)
    keep = lp >= lp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(alpha, dtype=lp.dtype))
    return ((1 + beta) * strong - beta * weak).masked_fill(~keep, float("-inf"))


def _route_to_rank(module, args, output, *, rank: int):
    """Forward hook on a top-k router: its (logits, weights, index) now send every token to
    its rank-th expert only. The experts module still gets k columns: the chosen expert in
    each, weight 1 in the first and 0 in the rest, so the sum is exactly that one expert."""
    if not (isinstance(output, tuple) and len(output) == 3):
        raise DistilError(f"SCMoE needs routers that return (logits, weights, index); {type(module).__name__} does not")
    logits, weights, index = output
    chosen = torch.topk(logits.float().softmax(dim=-1), rank, dim=-1).indices[:, rank - 1 : rank]
    index = chosen.expand(-1, index.shape[-1]).to(index.dtype).contiguous()
    single = torch.zeros_like(weights)
    single[:, 0] = 1
    return logits, single, index


@contextlib.contextmanager
def weak_routing(model, rank: int):
    """Within the block every MoE layer of ``model`` routes each token to its rank-th expert alone."""
    handles = [r.register_forward_hook(partial(_route_to_rank, rank=rank)) for r in routers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SCMoELogitsProcessor:
    """A transformers logits processor (the ``LogitsProcessor`` protocol, ``(input_ids,
    scores) -> scores``; not subclassed so that importing this module stays free of
    transformers) turning the strong logits ``generate`` hands it into SCMoE scores.

    ``attention_mask`` [batch, prompt_len] is the prompts' (left-padded) mask; with
    ``num_return_sequences`` the rows are repeated as ``generate`` repeats them. The weak
    pass keeps its own KV cache and mirrors ``generate``'s inputs: the mask grows by a 1 per
    step and positions are ``cumsum(mask) - 1``, so left padding is handled the same way.
    ``around`` is entered around each weak pass (e.g. to pause router recording)."""

    def __init__(self, model, attention_mask: torch.Tensor | None, *, beta: float, alpha: float, weak_rank: int,
                 around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):  # fmt: skip
        self.model, self.prompt_mask = model, attention_mask
        self.beta, self.alpha, self.rank, self.around = beta, alpha, weak_rank, around
        self.cache, self.mask, self.last_pos, self.seen = None, None, None, 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        weak = self._weak(input_ids).to(scores.device)
        return contrast(scores, weak, self.beta, self.alpha)

    def _weak(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Weak logits [batch, vocab] for the next token after ``input_ids``."""
        n, length = input_ids.shape
        device = input_ids.device
        if self.cache is None or length <= self.seen or n != self.mask.shape[0]:  # first step: the prompts
            mask = self.prompt_mask if self.prompt_mask is not None else torch.ones_like(input_ids)
            mask = mask.to(device)
            if n != mask.shape[0]:
                mask = mask.repeat_interleave(n // mask.shape[0], dim=0)
            if mask.shape != input_ids.shape:
                raise RuntimeError(f"SCMoE got prompts of shape {tuple(input_ids.shape)} but a mask of {tuple(mask.shape)}")
            self.cache, self.mask = None, mask.long()
            new = input_ids
            pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        else:
            new = input_ids[:, self.seen :]
            self.mask = torch.cat([self.mask, self.mask.new_ones((n, new.shape[1]))], dim=-1)
            pos = self.last_pos + torch.arange(1, new.shape[1] + 1, device=device)
        with self.around(), weak_routing(self.model, self.rank):
            out = self.model(input_ids=new, attention_mask=self.mask, position_ids=pos, cache=self.cache,
                             use_cache=True, logits_to_keep=1)  # fmt: skip
        self.cache, self.last_pos, self.seen = out.cache, pos[:, -1:], length
        return out.logits[:, -1].float()


@dataclass(frozen=True)
class SCMoE:
    """SCMoE settings; called with (model, prompt attention mask) it makes the processors
    for one ``model.generate`` call (the ``decode=`` argument of ``lm_training.sample``)."""

    beta: float = 0.5
    alpha: float = 0.1
    weak_rank: int = 2

    def __call__(self, model, attention_mask: torch.Tensor | None):
        from transformers import LogitsProcessorList

        from stages.lm.moe.routing import paused  # the weak passes are not the model's routing: a recorder skips them

        processor = SCMoELogitsProcessor(
            model, attention_mask, beta=self.beta, alpha=self.alpha, weak_rank=self.weak_rank, around=partial(paused, model)
        )
        return LogitsProcessorList([processor])


def decoding(cfg, model, path: str | Path) -> SCMoE | None:
    """The ``decode=`` argument for a stage config with ``decode`` / ``scmoe_*`` fields and
    its loaded model: None for greedy (the model's own distribution), else a checked SCMoE."""
    check_decode(cfg.decode, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_weak_rank)
    if cfg.decode == "greedy":
        return None
    check_model(model, path, cfg.scmoe_weak_rank)
    return SCMoE(beta=cfg.scmoe_beta, alpha=cfg.scmoe_alpha, weak_rank=cfg.scmoe_weak_rank)
