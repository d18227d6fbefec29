"""Served answers as OpenAI JSON: the text completion and chat completion objects, their
streamed chunks (server-sent events ending in ``data: [DONE]``) and usage.

Formats: https://platform.openai.com/docs/api-reference/completions/object (legacy
``logprobs`` = {tokens, token_logprobs, top_logprobs, text_offset}),
https://platform.openai.com/docs/api-reference/chat/object (``logprobs.content`` entries
{token, logprob, bytes, top_logprobs}) and .../chat/streaming (``chat.completion.chunk``).
``text_offset`` is each token's position in the choice's ``text`` (with ``echo`` the prompt
comes first); a choice carries the extension field ``distil`` (route, cost) when the engine
is a cascade. A stream is rendered from the finished completion, token by token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from starlette.responses import Response

from stages.lm.serve.tokens import Token, offsets

Name = Callable[[int], str]
"""A token id's string in an answer: its decoded text, or ``token_id:{id}``."""


@dataclass
class Choice:
    """One answer of one prompt; ``pieces`` is the text of each generated token (joined: ``text``)."""

    index: int
    text: str
    pieces: list[str]
    count: int
    finish_reason: str
    tokens: list[Token] | None = None
    """with log-probs asked for: one per generated token"""
    distil: dict | None = None
    prompt_text: str = ""
    """with echo: the prompt, which the answer's text starts with"""
    prompt_pieces: list[str] = field(default_factory=list)
    prompt_tokens: list[Token] | None = None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_plain)


class JSON(Response):
    """A JSON response that also takes numpy values (a cascade's costs)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict], usage: dict | None | bool = False) -> dict:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not False:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(objects: Iterator[dict]) -> Iterator[str]:
    for obj in objects:
        yield f"data: {dumps(obj)}\n\n"
    yield "data: [DONE]\n\n"


def _with_distil(body: dict, c: Choice) -> dict:
    if c.distil is not None:
        body["distil"] = c.distil
    return body


def _top(top: list[tuple[int, float]], name: Name) -> dict[str, float]:
    """{token: log-prob}; where several ids decode to one string (bytes of one character), the
    most likely one's log-prob (``top`` is sorted)."""
    out: dict[str, float] = {}
    for i, lp in top:
        out.setdefault(name(i), lp)
    return out


def completion_logprobs(tokens: list[Token], parts: list[str], name: Name, start: int = 0) -> dict:
    return {
        "tokens": [name(t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.top is None else _top(t.top, name) for t in tokens],
        "text_offset": offsets(parts, start),
    }


def completion_choice(c: Choice, name: Name) -> dict:
    logprobs = None
    if c.tokens is not None:
        logprobs = completion_logprobs(
            (c.prompt_tokens or []) + c.tokens, (c.prompt_pieces if c.prompt_text else []) + c.pieces, name
        )
    return _with_distil(
        {"index": c.index, "text": c.prompt_text + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}, c
    )


def completion_chunks(c: Choice, name: Name) -> Iterator[dict]:
    """The choice's stream: the echoed prompt, one chunk per token, then the finish reason."""
    asked = c.tokens is not None
    if c.prompt_text:
        lp = completion_logprobs(c.prompt_tokens or [], c.prompt_pieces, name) if asked else None
        yield {"index": c.index, "text": c.prompt_text, "logprobs": lp, "finish_reason": None}
    start = len(c.prompt_text)
    for t, piece in enumerate(c.pieces):
        lp = completion_logprobs([c.tokens[t]], [piece], name, start) if asked and t < len(c.tokens) else None
        yield {"index": c.index, "text": piece, "logprobs": lp, "finish_reason": None}
        start += len(piece)
    yield _with_distil({"index": c.index, "text": "", "logprobs": None, "finish_reason": c.finish_reason}, c)


def _entry(token_id: int, logprob: float, name: Name) -> dict:
    s = name(token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(tokens: list[Token], name: Name) -> dict:
    return {
        "content": [
            {**_entry(t.id, t.logprob, name), "top_logprobs": [_entry(i, lp, name) for i, lp in t.top or []]} for t in tokens
        ]
    }


def chat_choice(c: Choice, name: Name) -> dict:
    logprobs = chat_logprobs(c.tokens, name) if c.tokens is not None else None
    message = {"role": "assistant", "content": c.text}
    return _with_distil({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}, c)


def chat_chunks(c: Choice, name: Name) -> Iterator[dict]:
    """The choice's stream: the role, one content delta per token, then the finish reason."""
    yield {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    for t, piece in enumerate(c.pieces):
        lp = chat_logprobs([c.tokens[t]], name) if c.tokens is not None and t < len(c.tokens) else None
        yield {"index": c.index, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}
    yield _with_distil({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}, c)
