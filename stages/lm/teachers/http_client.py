"""The retrying async transport of the HTTP teacher: JSON requests to an OpenAI-compatible
server, at most ``concurrency`` in flight, each retried on what a busy or restarting server
answers (429, 5xx, dropped connections, timeouts, malformed bodies) with exponential backoff,
jitter and ``Retry-After``; every other 4xx is a ``DistilError`` carrying the server's
message (OpenAI error bodies: ``{"error": {"message", "type", "param", "code"}}``).

The API key lives only in the request headers; it is never part of a repr, and any server
message quoted in an error has it masked.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from stages.errors import DistilError

RETRY_AFTER_CAP = 120.0
"""seconds: the longest ``Retry-After`` honoured, so a misbehaving server cannot stall a run for hours"""


class Malformed(ValueError):
    """A 2xx answer that is not the JSON the request expects; retried like a 5xx."""


@dataclass(frozen=True)
class Request:
    """One call: ``parse`` turns the JSON body into the result; ``Malformed`` (or a KeyError,
    TypeError, IndexError, AttributeError) it raises on a body of the wrong shape means retry,
    a ``DistilError`` means stop."""

    method: str
    path: str
    body: dict | None
    parse: Callable[[Any], Any]


@dataclass
class Transport:
    url: str
    key: str | None = field(repr=False)
    key_env: str
    timeout: float
    retries: int
    backoff: float
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    jitter: Callable[[], float] = field(default=random.random, repr=False)

    def run(self, requests: list[Request], concurrency: int) -> list:
        """The results of ``requests`` in order: all of them, or the first error."""
        return run_sync(lambda: self._gather(requests, concurrency))

    async def _gather(self, requests: list[Request], concurrency: int) -> list:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout, limits=limits) as client:

            async def one(request: Request):
                async with gate:
                    return await self._call(client, request)

            tasks = [asyncio.ensure_future(one(r)) for r in requests]
            try:
                return await asyncio.gather(*tasks)
            finally:  # one request failed for good: stop the others before the client closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, client: httpx.AsyncClient, request: Request):
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = await asyncio.wait_for(client.request(request.method, request.path, json=request.body), self.timeout)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                last = f"no answer within {self.timeout:g} s (teacher.timeout)"
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {self.mask(str(e)) or 'no detail'})"
            else:
                code = response.status_code
                if code in (401, 403):
                    raise DistilError(self._key_message(response))
                if code == 429 or code >= 500:
                    last, retry_after = f"HTTP {code}: {self._message(response)}", parse_retry_after(response)
                elif code >= 400:
                    raise DistilError(f"teacher server {self.url} refused {request.method} {request.path}: HTTP {code}: {self._message(response)}")
                else:
                    try:
                        return request.parse(response.json())
                    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # JSONDecodeError and Malformed too
                        last = f"malformed response to {request.path} ({type(e).__name__}: {self.mask(str(e))[:200]})"
            if attempt < self.retries:
                await self.sleep(self.delay(attempt, retry_after))
        raise DistilError(
            f"teacher server {self.url}: {last} after {self.retries} retries; check that it is up and speaks the OpenAI API "
            "(teacher.retries, teacher.backoff and teacher.timeout set the patience)"
        )

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry ``attempt + 1``: exponential backoff with up to 50% jitter, or
        the server's ``Retry-After`` when that is longer."""
        backoff = self.backoff * 2**attempt * (1 + 0.5 * self.jitter())
        return max(backoff, min(retry_after or 0.0, RETRY_AFTER_CAP))

    def mask(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def _message(self, response: httpx.Response) -> str:
        try:
            body = response.json()
            error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
            text = error.get("message", error) if isinstance(error, dict) else error
        except ValueError:
            text = response.text
        return self.mask(" ".join(str(text).split()))[:300] or response.reason_phrase

    def _key_message(self, response: httpx.Response) -> str:
        if not self.key:
            return f"teacher server {self.url} needs an API key: set ${self.key_env} (teacher.api_key_env names the variable)"
        return (
            f"teacher server {self.url} refused the API key in ${self.key_env} (HTTP {response.status_code}: {self._message(response)}); "
            "check the key (teacher.api_key_env names the variable)"
        )


def parse_retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date (RFC 9110, 10.2.3)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def run_sync(make: Callable[[], Awaitable]):
    """Run a coroutine from sync code, also when the caller already runs an event loop (then in
    a worker thread, since ``asyncio.run`` refuses a nested loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
