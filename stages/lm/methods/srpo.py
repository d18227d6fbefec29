"""The losses of ``srpo`` and ``sdpo``: GRPO's rollouts, with failed rollouts distilled toward the
model itself reading a correct sibling (self-distillation policy optimisation).

SDPO (Hübotter et al., "Reinforcement Learning via Self-Distillation", 2026): the self-teacher is
the model (an EMA copy, rate ``EMA``) conditioned on feedback, here a correct rollout of the same
group shown before the question again (``reward.feedback``); it re-scores the student's own
tokens, and the student minimises the generalised JSD (beta 1/2) to its top-``TOP_K``
distribution at every token of the rollout.

SRPO ("Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing",
2026, section 3): a rollout that failed (reward < 1/2) while a sibling succeeded goes to
SDPO, every other one to GRPO's clipped objective (``reward.RewardLoss``); SDPO's tokens are
weighted by w = exp(-H(q)) over the self-teacher's entropy H, normalised to mean 1 over the SDPO
tokens (a target that is unsure teaches little), and the loss is the sum of both parts' token
losses over the number of routed tokens. ``sdpo`` alone sends every rollout with a correct
sibling to self-distillation and none to GRPO: the reference point whose late collapse SRPO's
routing is meant to avoid.
"""

from __future__ import annotations

import copy

import torch

from stages.lm.methods.on_policy import scored_top_k
from stages.lm.methods.reward import RewardLoss, clipped_surrogate, group_advantages, trrd_log_ratio
from stages.lm.training import IGNORE
from stages.losses import DIVERGENCES
from stages.losses.fused import final_hidden, fused_top_k, output_layer

EMA, TOP_K, CORRECT = 0.05, 100, 0.5


class SelfDistillLoss(RewardLoss):
    """``loss(model, batch)`` of ``srpo`` (``route_grpo``) or ``sdpo`` (not)."""

    def __init__(self, method, cfg, tokenizer, max_len: int, verifier, *, route_grpo: bool):
        super().__init__(method, cfg, None, tokenizer, max_len, verifier)
        self.route_grpo, self.ema, self.sdpo_share = route_grpo, None, []

    def __call__(self, m, b: dict) -> torch.Tensor:
        from stages.lm.teachers.transformers_backend import TransformersTeacher

        self._update_ema(m)
        ids, mask, labels, rewards, prompts, completions = self._rollouts(m, b)
        g = self.r.group_size
        right = (rewards >= CORRECT).view(-1, g)
        sibling = [self._sibling(right[i // g], i % g) for i in range(len(ids))]
        to_sdpo = torch.tensor([s is not None and (not right[i // g, i % g] or not self.route_grpo) for i, s in enumerate(sibling)])
        to_grpo = ~to_sdpo if self.route_grpo else torch.zeros_like(to_sdpo)
        self.sdpo_share.append(float(to_sdpo.float().mean()))
        keep = labels[:, 1:] != IGNORE
        device = ids.device
        hidden, head, logits = self._forward(m, ids, mask)
        total = 0.0 * (hidden if hidden is not None else logits).sum()  # a zero that backpropagates when nothing is routed
        n_tokens = (keep & (to_sdpo | to_grpo).to(device)[:, None]).sum()
        if to_grpo.any():
            adv = group_advantages(rewards.view(-1, g)).view(-1).to(device)
            grpo_keep = keep & to_grpo.to(device)[:, None]
            logp = self._chosen(hidden, head, logits, grpo_keep, labels)
            seq = torch.arange(len(ids), device=device)[:, None].expand_as(grpo_keep)[grpo_keep]
            total = total - clipped_surrogate(trrd_log_ratio(logp, logp, logp, 0.0), adv[seq], self.r.clip).sum()
        if to_sdpo.any():
            rows = to_sdpo.nonzero().flatten().tolist()
            contexts = [self._context(prompts[i], completions[i - i % g + sibling[i]]) for i in rows]
            teacher = TransformersTeacher("self", device, model=self.ema, tokenizer=self.tokenizer)
            t_ids, t_lp = scored_top_k(teacher, ids[rows], labels[rows], TOP_K, prompts=contexts)
            t_ids, t_lp = _spread(t_ids, t_lp, rows, ids.shape)
            sd_keep = keep & to_sdpo.to(device)[:, None]
            w = _entropy_weights(t_lp[:, :-1], sd_keep)
            target = (t_ids[:, :-1], t_lp[:, :-1])
            hyper = {"beta": 0.5, "temperature": 1.0}
            if hidden is not None:
                mean = fused_top_k(hidden[:, :-1], head, sd_keep, None, target, DIVERGENCES["jsd"], hyper=hyper, weight=w,
                                   alpha=1.0, chunk=self.cfg.lm.loss_chunk)  # fmt: skip
            else:
                mean = DIVERGENCES["jsd"](logits[:, :-1], target, mask=sd_keep, weight=w, **hyper)
            total = total + mean * sd_keep.sum()  # the weights average 1 over these tokens: mean x count = their sum
        return total / n_tokens.clamp_min(1)

    def _update_ema(self, m) -> None:
        """The self-teacher: an EMA of the student's weights, theta' <- (1 - EMA) theta' + EMA theta."""
        if self.ema is None:
            self.ema = copy.deepcopy(m).eval().requires_grad_(False)
            return
        with torch.no_grad():
            for t, s in zip(self.ema.parameters(), m.parameters(), strict=True):
                t.lerp_(s.detach(), EMA)

    @staticmethod
    def _sibling(right: torch.Tensor, j: int) -> int | None:
        """A correct rollout of the group other than ``j`` (the first), or None."""
        return next((k for k in range(len(right)) if k != j and bool(right[k])), None)

    def _context(self, prompt: list[int], solution: list[int]) -> list[int]:
        """The self-teacher's prompt: ``reward.feedback`` with the question and the sibling's solution."""
        text = self.tokenizer.decode(prompt, skip_special_tokens=True)
        shown = self.tokenizer.decode(solution, skip_special_tokens=True).strip()
        rendered = self.r.feedback.replace("{solution}", shown).replace("{prompt}", text)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _forward(self, m, ids, mask):
        """(hidden [B, T, H], head, None) on the fused path, else (None, None, logits [B, T, V])."""
        layer = output_layer(m) if self.cfg.lm.loss_chunk > 0 else None
        if layer is None:
            return None, None, m(input_ids=ids, attention_mask=mask).logits
        hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
        return hidden, head, None

    def _chosen(self, hidden, head, logits, keep, labels) -> torch.Tensor:
        from stages.losses.fused import fused_token_logprobs

        targets = labels[:, 1:].clamp_min(0)
        if hidden is not None:
            return fused_token_logprobs(hidden[:, :-1], head, keep, targets, chunk=self.cfg.lm.loss_chunk)
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets[..., None]).squeeze(-1)
        return lp[keep]

    def summary(self) -> dict:
        out = super().summary()
        if self.sdpo_share:
            out["self_distilled_share"] = sum(self.sdpo_share) / len(self.sdpo_share)
        return out


def _spread(t_ids, t_lp, rows: list[int], shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDPO rows' top-k placed in a [B, T, k] batch (nothing, log-prob -1e4, elsewhere)."""
    ids = torch.zeros((*shape, t_ids.shape[-1]), dtype=torch.long, device=t_ids.device)
    lp = torch.full((*shape, t_ids.shape[-1]), -1e4, dtype=t_lp.dtype, device=t_lp.device)
    ids[rows], lp[rows] = t_ids, t_lp
    return ids, lp


def _entropy_weights(t_lp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """SRPO's token weights exp(-H(q)), H over the self-teacher's top-k and the rest as one bucket,
    normalised to mean 1 over ``keep``; [B, T]."""
    q = t_lp.exp()
    tail = (1 - q.sum(-1)).clamp_min(1e-12)
    h = -(q * t_lp.clamp_min(-1e3)).sum(-1) - tail * tail.log()
    w = torch.exp(-h) * keep
    return w / (w.sum() / keep.sum().clamp_min(1)).clamp_min(1e-12)
