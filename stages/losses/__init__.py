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


def divergence_hyper(name: str, cfg) -> dict:
    """The keyword arguments a divergence of ``DIVERGENCES`` takes from a distill config."""
    extra = {"jsd": {"beta": cfg.beta}, "skew-kl": {"skew": cfg.skew, "reverse": cfg.reverse_skew}}.get(name, {})
    return {"temperature": cfg.temperature, **extra}


__all__ = ["DIVERGENCES", "cross_entropy", "divergence_hyper"]
