"""Language-model distillation methods: one explicit name -> method table.

What each method needs is declared here, so ``stages.lm.distill`` validates its inputs
and builds its loss from the declaration alone, never from the method's name: gold answers
or teacher completions (``sft``), stored top-k teacher log-probs (the token-level
divergences, ``tsd``, ``mst``), or one live teacher (``on-policy``). ``divergence`` names
the loss of ``stages.losses.DIVERGENCES`` the method applies. The losses live beside this
table: ``token_level`` (top-k divergences, TSD's token selection), ``on_policy`` (GKD),
``mst`` (the gate that picks one teacher per prompt), ``reward`` (``grpo``, ``rlad``: rollouts
scored by the task's verifier) and ``cross_tokenizer`` (``uld``, ``span-kd``:
a student with its own tokenizer, compared on aligned spans). Kept free of heavy imports so
``--help`` lists it cheaply.
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
    """The divergence of ``stages.losses.DIVERGENCES`` the method applies (none for sft)."""
    selective: bool = False
    """Distil only the tokens TSD-KD's selection keeps (``token_level._token_selection``)."""
    gated: bool = False
    """Train on the rows of the one teacher a gate picks per prompt (``mst.gate_rows``)."""
    reward: bool = False
    """Trained on its own rollouts scored by the task's verifier (``reward``: ``grpo``, ``rlad``)."""
    tempered_self: bool = False
    """CE plus a pull toward the model's own per-token tempered distribution (``curio``)."""
    reviser: bool = False
    """A self-revision phase first, then the frozen reviser distilled into the generator (``sd-zero``)."""
    self_teacher: str = ""
    """Reward methods that distil rollouts toward the model reading a correct sibling (``srpo``):
    'routed' (failed rollouts only, the rest to GRPO) or 'all' (no GRPO)."""
    contrastive: bool = False
    """Self-consistent teacher samples as positives, an earlier student's samples as negatives (``qcrd``)."""
    cross_tokenizer: bool = False
    """The student may split text differently from the teacher: ``divergence`` names a loss of
    ``stages.losses.cross_tokenizer.CROSS_TOKENIZER``, compared on aligned spans (``cross_tokenizer``)."""

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
    "uld": LMMethod(
        "cross-tokenizer: ULD, L1 between sorted probabilities (Wasserstein-1) of the stored top-k teacher and the "
        "student on aligned spans, mixed with CE; the student may have its own tokenizer", "top-k", "uld", cross_tokenizer=True,
    ),  # fmt: skip
    "span-kd": LMMethod(
        "cross-tokenizer: KL on each aligned span's probability and on the teacher's top-k that map to student tokens "
        "by exact string, mixed with CE; the student may have its own tokenizer", "top-k", "span-kd", cross_tokenizer=True,
    ),  # fmt: skip
    "on-policy": LMMethod(
        "GKD: the student samples completions (share lmbda of batches), a live --teacher scores every token", "live", "jsd"
    ),
    "grpo": LMMethod(
        "GRPO: the student samples reward.group_size completions per prompt, the task's verifier scores them, and a "
        "clipped policy gradient moves it toward the above-average ones (no teacher; the reference point)", reward=True,
    ),  # fmt: skip
    "rlad": LMMethod(
        "RL-aware distillation: GRPO whose trust-region ratio is anchored to a mix of the live --teacher and the old "
        "policy (TRRD), so the student imitates the teacher where that helps the advantage", "live", reward=True,
    ),  # fmt: skip
    "curio": LMMethod(
        "entropy-preserving SFT (CurioSFT): CE on the completions plus a pull toward the model's own distribution, "
        "tempered per token from its entropy, so sampling stays diverse (gold answers or teacher completions)",
        tempered_self=True,
    ),  # fmt: skip
    "srpo": LMMethod(
        "sample-routed policy optimisation: GRPO on rollouts that succeeded (or had no correct sibling), self-distillation "
        "toward the model reading a correct sibling on the ones that failed, entropy-weighted", reward=True, self_teacher="routed",
    ),  # fmt: skip
    "sdpo": LMMethod(
        "self-distillation policy optimisation: every rollout with a correct sibling distilled toward the model reading that "
        "sibling (JSD on its own tokens), no GRPO term", reward=True, self_teacher="all",
    ),  # fmt: skip
    "sd-zero": LMMethod(
        "Self-Distillation Zero: the model learns to revise its own answers given their verifier reward, then that "
        "reviser, frozen, scores the model's answers token by token (reverse KL on its top-64)", reward=True, reviser=True,
    ),  # fmt: skip
    "qcrd": LMMethod(
        "quality-guided contrastive rationale distillation: CE on self-consistent teacher samples, a margin loss pushing "
        "down an earlier student's samples, both weighted by an online discriminator's quality scores (teacher data)",
        contrastive=True,
    ),  # fmt: skip
    "tsd": LMMethod(
        "token-selective KD: only tokens where the teacher is more confident than the student, plus an entropy penalty",
        "top-k", "kd", selective=True,
    ),  # fmt: skip
    "mst": LMMethod(
        "mixture of specialised teachers: on teacher data from several teachers a gate (confidence or task) picks one "
        "per prompt; kd on its rows", "top-k", "kd", gated=True,
    ),  # fmt: skip
}
