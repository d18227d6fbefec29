"""The ``Teacher`` behind an OpenAI-compatible server (vLLM, ``distil serve``, OpenAI or any
server speaking its API): ``--teacher http://HOST:PORT/v1``.

The constructor asks ``GET /v1/models`` once: it picks the model, fails early on a missing
API key, reads the context length (vLLM's ``max_model_len``, or ``context_length``) and the
tokenizer fingerprint ``distil serve`` advertises. Token ids are trusted only with a local
``teacher.tokenizer`` whose fingerprint matches (or when the server advertises none), and
then checked per completion: every token must map to an id and the ids must decode to the
returned text. Otherwise the teacher is text only (``token_ids`` None), which suits ``sft``.

``generate`` sends one request per prompt (``/v1/completions`` or ``/v1/chat/completions``),
``score`` one echoed ``/v1/completions`` request per pair; the transport (``http_client``)
bounds the requests in flight and retries; the parsers live in ``http_parse``.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from urllib.parse import urlsplit

from stages.errors import DistilError
from stages.lm.teachers.base import Completion, Sampling, Scored
from stages.lm.teachers.http_client import Malformed, Request, Transport
from stages.lm.teachers.http_parse import TokenMap, choices_of, to_completion, to_scored


class HTTPTeacher:
    """Attributes besides the protocol's: ``model`` (the served name), ``same_tokenizer``
    (the server's token ids are ids of ``tokenizer``), ``why_text_only`` (why not, else None),
    ``rows_without_ids`` / ``why_no_ids`` (completions whose ids failed the per-completion
    check, and the last reason). A completion without ids stores no top-k (``k`` 0)."""

    def __init__(self, url: str, cfg):
        self.url, self.cfg = base_url(url), cfg
        key = os.environ.get(cfg.api_key_env) or None
        self._transport = Transport(self.url, key, cfg.api_key_env, cfg.timeout, cfg.retries, cfg.backoff)
        served = self._transport.run([Request("GET", "/models", None, served_models)], 1)[0]
        entry = pick_model(self.url, served, cfg.model)
        self.model = entry["id"]
        self.context = context_length(entry)
        self.tokenizer, self.same_tokenizer, self.why_text_only = self._local_tokenizer(entry.get("tokenizer"))
        self._tokens = TokenMap(self.tokenizer) if self.same_tokenizer else None
        self.identity = {
            "backend": "http", "url": self.url, "model": self.model,
            "sha256": hashlib.sha256(f"{self.url}|{self.model}".encode()).hexdigest(),
            "tokenizer": self._fingerprint(self.tokenizer) if self.same_tokenizer else None,
        }  # fmt: skip
        self.rows_without_ids, self.why_no_ids = 0, None
        self._closed = False

    def __repr__(self) -> str:
        return f"HTTPTeacher(url={self.url!r}, model={self.model!r})"

    @staticmethod
    def _fingerprint(tokenizer) -> dict:
        from stages.lm.teachers.vocabulary import tokenizer_fingerprint

        return tokenizer_fingerprint(tokenizer)

    def _local_tokenizer(self, served) -> tuple[object, bool, str | None]:
        if not self.cfg.tokenizer:
            return None, False, "teacher.tokenizer is not set, so the server's tokens have no local ids (set it to the model's tokenizer)"
        from stages.lm.models import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.tokenizer)
        if isinstance(served, dict) and served.get("sha256"):
            local = self._fingerprint(tokenizer)
            if served["sha256"] != local["sha256"] or served.get("eos_token_id", local["eos_token_id"]) != local["eos_token_id"]:
                return tokenizer, False, (
                    f"the server's tokenizer ({served.get('vocab_size')} tokens) differs from teacher.tokenizer "
                    f"{self.cfg.tokenizer} ({local['vocab_size']} tokens)"
                )
        return tokenizer, True, None

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        self._check_open()
        if not prompts:
            return []
        requests = [self._generate_request(i, p, n, sampling) for i, p in enumerate(prompts)]
        out = []
        for rows in self._transport.run(requests, self.cfg.concurrency):
            for completion, why in rows:
                if why is not None:
                    self.rows_without_ids, self.why_no_ids = self.rows_without_ids + 1, why
                out.append(completion)
        return out

    def _generate_request(self, i: int, prompt: str, n: int, s: Sampling) -> Request:
        chat, k = self.cfg.api == "chat", s.top_k
        body = {"model": self.model, "n": n, "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                "seed": s.seed + i}  # fmt: skip
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            body.update({"logprobs": True, "top_logprobs": k} if k else {})
        else:
            body["prompt"] = prompt
            body.update({"logprobs": k} if k else {})
        if k and self.same_tokenizer and self.cfg.token_ids:
            body["return_tokens_as_token_ids"] = True
        return Request("POST", "/chat/completions" if chat else "/completions", body, partial(self._completions, n, k, chat))

    def _completions(self, n: int, k: int, chat: bool, payload: dict) -> list[tuple[Completion, str | None]]:
        choices = choices_of(payload, n, chat)
        if k and any(c.tokens is None for c in choices):
            raise DistilError(
                f"teacher server {self.url}: the server returned no logprobs; it cannot serve top-k teacher data: "
                "set top_k=0 (text only) or use a server that returns logprobs"
            )
        usage = payload.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        share = round(int(usage.get("completion_tokens") or 0) / n)
        return [to_completion(c, k, self._tokens, prompt_tokens, share) for c in choices]

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list[Scored]:
        self._check_open()
        if not self.same_tokenizer:
            raise DistilError(f"scoring through teacher server {self.url} needs the server's token ids, but {self.why_text_only}")
        if len(prompt_ids) != len(completion_ids):
            raise DistilError(f"score got {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        if not prompt_ids:
            return []
        if any(not p for p in prompt_ids):
            raise DistilError("scoring needs at least one prompt token per pair (the first token of a sequence has no log-prob)")
        requests = []
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            # max_tokens 1, not 0: vLLM refuses 0; the one generated token is past the positions read
            body = {"model": self.model, "prompt": [*p, *c], "echo": True, "max_tokens": 1, "logprobs": top_k, "temperature": 0}
            if self.cfg.token_ids:
                body["return_tokens_as_token_ids"] = True
            requests.append(Request("POST", "/completions", body, partial(self._scored, len(p), list(c), top_k)))
        return self._transport.run(requests, self.cfg.concurrency)

    def _scored(self, prompt_len: int, completion: list[int], top_k: int, payload: dict) -> Scored:
        return to_scored(payload, prompt_len, completion, top_k, self._tokens)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def close(self) -> None:
        """Each call opens and closes its own pooled client (an ``httpx.AsyncClient`` belongs to
        the event loop it ran in); closing refuses further calls."""
        self._closed = True


def base_url(url: str) -> str:
    """``http(s)://HOST[:PORT]/.../v1`` without its trailing slash; anything else is refused."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DistilError(f"teacher URL '{url}' is not an http(s) URL; give the server's base URL, e.g. http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise DistilError("the teacher URL carries credentials; remove them and put the API key in $OPENAI_API_KEY (teacher.api_key_env)")
    if not parts.path.endswith("/v1"):
        cut = parts.path.find("/v1/")
        path = parts.path[:cut] if cut >= 0 else parts.path
        raise DistilError(f"teacher URL {url} must be the server's base URL ending in /v1: use {parts.scheme}://{parts.netloc}{path}/v1")
    return url


def served_models(payload: dict) -> list[dict]:
    """The model objects of a ``GET /v1/models`` answer (``{"object": "list", "data": [...]}``)."""
    data = payload["data"]
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise Malformed("/models 'data' is not a list of model objects with an 'id'")
    return data


def pick_model(url: str, served: list[dict], want: str) -> dict:
    names = [m["id"] for m in served]
    if not names:
        raise DistilError(f"teacher server {url} serves no model (GET /v1/models lists none)")
    if not want:
        if len(names) == 1:
            return served[0]
        raise DistilError(f"teacher server {url} serves several models ({', '.join(names)}); set teacher.model")
    for m in served:
        if m["id"] == want:
            return m
    raise DistilError(f"teacher server {url} has no model '{want}': it serves {', '.join(names)}; set teacher.model")


def context_length(entry: dict) -> int | None:
    value = entry.get("max_model_len") or entry.get("context_length")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None
