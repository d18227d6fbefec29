"""Tiny helpers shared by the benchmarks: a median timer and a one-JSON-line emitter."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(name: str, **fields: object) -> None:
    """Print one JSON object, ``{"bench": name, **fields}``, on its own line to stdout."""
    print(json.dumps({"bench": name, **fields}), file=sys.stdout, flush=True)
