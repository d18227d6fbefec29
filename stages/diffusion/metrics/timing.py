"""Wall-clock cost of sampling: seconds per 1,000 samples of a callable.

``seconds_per_1k(fn, n)`` times ``fn(n)`` and ``fn(2 n)`` (after one warm-up call) and
reports the *marginal* cost, 1000 * (t(2n) - t(n)) / n, each t the fastest of ``repeats``
calls (as ``timeit`` advises: slower runs measure other load on the machine, not the
code): fixed costs inside ``fn`` (loading a model folder, building a scheduler) cancel,
so a sampler that reloads its model on every call is charged only for sampling. When
noise makes the difference non-positive (sub-millisecond calls), it falls back to the
average cost 1000 * t(2n) / (2n), an upper bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from stages.errors import DistilError


def seconds_per_1k(fn: Callable[[int], Any], n: int = 256, repeats: int = 3) -> float:
    if n < 1 or repeats < 1:
        raise DistilError(f"timing needs n >= 1 and repeats >= 1, got n={n}, repeats={repeats}")

    def timed(k: int) -> float:
        t0 = time.perf_counter()
        fn(k)
        return time.perf_counter() - t0

    fn(n)  # warm-up: lazy imports, allocator, caches
    small, large = [], []
    for _ in range(repeats):
        small.append(timed(n))
        large.append(timed(2 * n))
    marginal = (min(large) - min(small)) / n
    if marginal > 0:
        return 1000.0 * marginal
    return 1000.0 * min(large) / (2 * n)
