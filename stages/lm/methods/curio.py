"""The loss of ``distil distill --method curio``: entropy-preserving SFT (CurioSFT, "Learning While
Staying Curious: Entropy-Preserving Supervised Fine-Tuning via Adaptive Self-Distillation for Large
Reasoning Models", 2026).

Plain SFT on demonstrations sharpens the model until it samples one answer: its entropy, and the
pass@n that depends on it, collapse. CurioSFT keeps next-token CE on the demonstration and adds,
per token, a pull toward the model's own *tempered* distribution: a reference copy of the model
(an EMA of its weights, refreshed every ``REFRESH`` steps with rate ``RATE``), softened at a
temperature chosen per token from its entropy so that tokens where the model is unsure (reasoning
forks) are kept open and sure ones (facts) stay sharp:

- H = the reference's entropy over its top ``TOP`` logits at temperature 1;
- the target entropy H* = H + 0.5 sigmoid(2 (H - 1.2)): almost H where H is small, half a nat
  more where it is large;
- tau in [1.1, 1.5] by bisection (20 halvings) so that the tempered top-``TOP`` entropy is H*
  (tau = 1.1 where the full entropy is below 0.03);
- per demonstration token y_t: l_t = -log p(y_t) + 0.5 (log p(y_t) - log p_ref^tau(y_t))^2,
  averaged over tokens (with the rows' weights).

These are the authors' released settings (their training recipe: ``compute_tau_from_logits`` and
the token loss of their actor); the paper's equations were not available to check them against.
"""

from __future__ import annotations

import copy

import torch

from stages.lm.training import IGNORE
from stages.losses.fused import final_hidden, fused_token_logprobs, output_layer
from stages.losses.logits import _wide

TOP, REFRESH, RATE, LOW, HIGH, SURE = 512, 5, 0.99, 1.1, 1.5, 0.03


def target_temperature(logits: torch.Tensor, halvings: int = 20) -> torch.Tensor:
    """Per row of ``logits`` [N, V]: CurioSFT's temperature tau (see the module docstring)."""
    z = _wide(logits)
    top = z.topk(min(TOP, z.shape[-1]), -1).values
    h = _entropy(top)
    goal = h + 0.5 * torch.sigmoid(2 * (h - 1.2))
    lo, hi = torch.full_like(h, LOW), torch.full_like(h, HIGH)
    for _ in range(halvings):
        mid = (lo + hi) / 2
        below = _entropy(top / mid[:, None]) < goal
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    tau = (lo + hi) / 2
    return torch.where(_entropy(z) <= SURE, torch.full_like(tau, LOW), tau)


def _entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, -1)
    return -(lp.exp() * lp).sum(-1)


class CurioLoss:
    """``loss(model, batch)`` of ``curio`` for ``fit``: CE plus the squared log-ratio to the tempered reference."""

    def __init__(self, chunk: int):
        self.chunk, self.ref, self.steps = chunk, None, 0

    def __call__(self, m, b: dict) -> torch.Tensor:
        self._refresh(m)
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        keep = labels[:, 1:] != IGNORE
        targets = labels[:, 1:].clamp_min(0)
        logp = self._student(m, ids, mask, keep, targets)
        with torch.no_grad():
            ref = self._reference(ids, mask, keep, targets)
        w = b["w"][:, None].expand_as(keep)[keep].to(logp.dtype)
        per = -logp + 0.5 * (logp - ref) ** 2
        return (per * w).sum() / w.sum().clamp_min(1e-12)

    def _refresh(self, m) -> None:
        """theta_ref <- (1 - RATE) theta_ref + RATE theta every REFRESH steps (a copy at the first)."""
        if self.ref is None:
            self.ref = copy.deepcopy(m).eval().requires_grad_(False)
        elif self.steps % REFRESH == 0:
            with torch.no_grad():
                for r, s in zip(self.ref.parameters(), m.parameters(), strict=True):
                    r.lerp_(s.detach(), RATE)
        self.steps += 1

    def _student(self, m, ids, mask, keep, targets) -> torch.Tensor:
        layer = output_layer(m) if self.chunk > 0 else None
        if layer is None:
            logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return torch.log_softmax(_wide(logits), -1).gather(-1, targets[..., None]).squeeze(-1)[keep]
        hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
        return fused_token_logprobs(hidden[:, :-1], head, keep, targets, chunk=self.chunk)

    def _reference(self, ids, mask, keep, targets) -> torch.Tensor:
        """log p_ref^tau(y_t) at the kept positions, a chunk of positions at a time."""
        layer = output_layer(self.ref)
        if layer is None:
            rows = self.ref(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
            project = lambda h: h  # noqa: E731
        else:
            hidden, head = final_hidden(self.ref, layer, input_ids=ids, attention_mask=mask)
            rows, project = hidden[:, :-1][keep], head.logits
        t = targets[keep]
        step = self.chunk if self.chunk > 0 else len(rows) or 1
        out = []
        for s in range(0, len(rows), step):
            z = _wide(project(rows[s : s + step]))
            tau = target_temperature(z)
            lp = torch.log_softmax(z / tau[:, None], -1)
            out.append(lp.gather(-1, t[s : s + step, None]).squeeze(-1))
        return torch.cat(out) if out else rows.new_zeros(0)
