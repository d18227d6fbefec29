"""Language-model distillation methods: one explicit name -> method table.

What each method needs is declared here, so ``stages.lm.distill`` validates its inputs
before anything trains: gold answers or teacher completions (``sft``), stored top-k
teacher log-probs (the token-level divergences, ``tsd``, ``mst``), or one live teacher
(``on-policy``). ``divergence`` names the loss of ``stages.losses.DIVERGENCES`` a
token-level method applies. Kept free of heavy imports so ``--help`` lists it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LMMethod:
    help: str
    teacher: str = "none"
    """'none' (gold answers or teacher completions as text), 'top-k' (stored top-k log-probs of
    LM teacher data) or 'live' (exactly one --teacher run on every batch)."""
    divergence: str = ""
    """The token-level divergence of ``stages.losses.DIVERGENCES`` the method applies."""

    @property
    def token_level(self) -> bool:
        return self.teacher == "top-k"


LM_METHODS: dict[str, LMMethod] = {
    "sft": LMMethod("next-token cross-entropy on completions (gold answers, or teacher completions from teacher data)"),
    "kd": LMMethod("token-level T^2 KL(p_t || p_s) against the stored top-k teacher log-probs, mixed with CE", "top-k", "kd"),
    "reverse-kl": LMMethod("token-level reverse KL against the stored top-k teacher log-probs", "top-k", "reverse-kl"),
    "jsd": LMMethod("token-level generalised JSD (beta) against the stored top-k teacher log-probs", "top-k", "jsd"),
    "skew-kl": LMMethod("token-level skew KL (DistiLLM) against the stored top-k teacher log-probs", "top-k", "skew-kl"),
    "tvd": LMMethod("token-level total variation against the stored top-k teacher log-probs", "top-k", "tvd"),
    "on-policy": LMMethod(
        "GKD: the student samples completions (share lmbda of batches), a live --teacher scores every token", "live", "jsd"
    ),
    "tsd": LMMethod(
        "token-selective KD: only tokens where the teacher is more confident than the student, plus an entropy penalty",
        "top-k", "kd",
    ),  # fmt: skip
    "mst": LMMethod(
        "mixture of specialised teachers: on teacher data from several teachers a gate (confidence or task) picks one "
        "per prompt; kd on its rows", "top-k", "kd",
    ),  # fmt: skip
}
