"""The async micro-batcher of ``distil serve``: concurrent requests that sample alike run as
one ``engine.generate`` call, and the engine runs in one worker thread.

Requests with equal (n, temperature, top_p, max_new_tokens, top_k) wait up to ``wait_s``
for each other and are run together, up to ``max_batch`` prompts (a single request with more
prompts runs alone). While the engine is busy a due batch stays open and keeps collecting
requests until the engine is free (continuous batching: under load, batches grow instead of
queueing up small). A batch samples under the seed of its first request, so a seeded
request is reproducible for a given batch composition; greedy results do not depend on
batching (up to floating-point ties). The engine is called from one thread only (the
backends are not thread-safe, and the event loop stays free to accept and answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stages.lm.teachers.base import Completion, Sampling


@dataclasses.dataclass
class _Batch:
    sampling: Sampling
    n: int
    jobs: list[tuple[list[str], asyncio.Future]] = dataclasses.field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None
    due: bool = False
    """its wait is over; it runs as soon as the engine is free"""


class Batcher:
    """Counts what it did for ``/health``: ``requests`` (generate requests), ``batches``
    (engine.generate calls), ``prompts`` (prompts in them), ``scores`` (engine.score calls)."""

    def __init__(self, engine, *, max_batch: int, wait_s: float):
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self.requests = self.batches = self.prompts = self.scores = 0
        self._open: dict[tuple, _Batch] = {}
        self._running: set[asyncio.Task] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0

    async def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in the engine's thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distil-engine")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list:
        self.scores += 1
        return await self.call(self.engine.score, prompt_ids, completion_ids, top_k)

    async def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        """``n`` completions per prompt, prompt-major, from a batch shared with alike requests."""
        loop = asyncio.get_running_loop()
        key = (n, sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.top_k)
        batch = self._open.get(key)
        if batch is not None and batch.size + len(prompts) > self.max_batch:
            self._launch(key, batch)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(sampling, n)
            batch.timer = loop.call_later(self.wait_s, self._due, key, batch)
        future = loop.create_future()
        batch.jobs.append((prompts, future))
        batch.size += len(prompts)
        self.requests += 1
        if batch.size >= self.max_batch:
            self._launch(key, batch)
        return await future

    def _due(self, key: tuple, batch: _Batch) -> None:
        """The batch's wait is over: it runs now, or once the engine's current call ends."""
        batch.due = True
        if not self._inflight:
            self._launch(key, batch)

    def _launch(self, key: tuple, batch: _Batch) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
            batch.timer.cancel()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)  # the loop keeps weak references to tasks only
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        prompts = [p for job, _ in batch.jobs for p in job]
        self.batches += 1
        self.prompts += len(prompts)
        self._inflight += 1
        try:
            rows = await self.call(self.engine.generate, prompts, batch.n, batch.sampling)
            if len(rows) != len(prompts) * batch.n:
                raise RuntimeError(f"the engine returned {len(rows)} completions for {len(prompts)} prompts x n={batch.n}")
        except Exception as exc:  # every request of the batch gets the engine's error
            for _, future in batch.jobs:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._inflight -= 1
            if not self._inflight:
                for key, waiting in [(k, b) for k, b in self._open.items() if b.due]:
                    self._launch(key, waiting)
        start = 0
        for job, future in batch.jobs:
            end = start + len(job) * batch.n
            if not future.done():  # a client that went away leaves a cancelled future
                future.set_result(rows[start:end])
            start = end

    def close(self) -> None:
        """Wait for the engine's last call (uvicorn has drained the requests by now)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
