"""Domains of the digits task: the same 8x8 digits under a fixed transformation each.

``--set 'data.domains=[none,rot90,flip]'`` on ``digits`` stacks one copy of the task per
domain (every copy split the same way, so a digit is in the same split in every domain).
A row's id carries its domain: ``id = DOMAIN_STRIDE * (position in data.domains) + digit
id`` (``domain_of``), so methods that need per-domain batches (``meta-dmoe``) find them
in any distil table built from these rows, and one domain alone keeps its plain ids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stages.errors import DistilError

DOMAIN_STRIDE = 1_000_000
"""Row id = DOMAIN_STRIDE * domain position + the digit's id."""


def _noise(images: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(12345)  # a fixed corruption: the same noisy digits in every run
    return np.clip(images + rng.normal(0.0, 0.25, images.shape), 0.0, 1.0)


def _shift(images: np.ndarray) -> np.ndarray:
    out = np.zeros_like(images)
    out[:, 1:, 1:] = images[:, :-1, :-1]  # one pixel down and right, the uncovered edge black
    return out


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip": lambda x: x[:, :, ::-1],
    "transpose": lambda x: x.transpose(0, 2, 1),
    "invert": lambda x: 1.0 - x,
    "shift": _shift,
    "noise": _noise,
}
"""Domain name -> transformation of a batch of [N, H, W] images in [0, 1]."""


def check_domains(domains: list[str]) -> None:
    unknown = [d for d in domains if d not in TRANSFORMS]
    if unknown:
        raise DistilError(f"unknown domain {unknown[0]!r} in data.domains; choose from {', '.join(TRANSFORMS)}")
    if len(set(domains)) != len(domains):
        raise DistilError(f"data.domains lists a domain twice ({domains}); give each once")


def apply_domain(name: str, images: np.ndarray) -> np.ndarray:
    """``images`` [N, H, W] under the domain ``name`` (float32, contiguous)."""
    check_domains([name])
    return np.ascontiguousarray(TRANSFORMS[name](images), dtype=np.float32)


def domain_of(ids: np.ndarray) -> np.ndarray:
    """The position in ``data.domains`` of each row id."""
    return np.asarray(ids) // DOMAIN_STRIDE
