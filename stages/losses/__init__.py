"""Loss functions by family, and the one explicit name -> function table.

``DIVERGENCES`` maps the names users type to pure divergence functions (no registry
decorators, no import side effects). Methods that are not a single divergence (``ce``)
are wired in the stage that trains them.
"""

from stages.losses.logits import cross_entropy, forward_kl, jsd, reverse_kl, skew_kl, tvd

DIVERGENCES = {
    "kd": forward_kl,
    "reverse-kl": reverse_kl,
    "jsd": jsd,
    "skew-kl": skew_kl,
    "tvd": tvd,
}

__all__ = ["DIVERGENCES", "cross_entropy"]
