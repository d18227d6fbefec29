"""From a validated request to answers: prompts as text and token ids, the server's limits
(``ServeConfig.max_tokens`` and ``max_logprobs``, the engine's context), the ``Sampling`` of
the request, and the engine calls (batched ``generate``; ``score`` for echoed prompts and for
sampled tokens outside the stored top-k).

Prompts of token ids are scored exactly as sent; to generate, they are decoded to text,
which the engine tokenizes again (the ``Teacher`` protocol generates from text), so a
sequence that does not survive decode -> encode is continued from its re-encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.config import ServeConfig
from stages.lm.serve.batching import Batcher
from stages.lm.serve.protocol import APIError, ChatRequest, CompletionRequest, chat_prompt
from stages.lm.serve.render import Choice, Name
from stages.lm.serve.tokens import Token, cut_at_stop, from_completion, from_scored, pieces
from stages.lm.teachers.base import Completion, Sampling

COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of a text completion."""


@dataclass
class Ask:
    """What a request asks for, whichever endpoint it came to."""

    prompts: list[tuple[str, list[int] | None]]
    n: int
    sampling: Sampling
    k: int | None
    """top log-probs per token; None: no log-probs"""
    echo: bool = False
    stops: tuple[str, ...] = ()


class Answers:
    def __init__(self, engine, batcher: Batcher, cfg: ServeConfig, name: str):
        self.engine, self.batcher, self.cfg, self.name = engine, batcher, cfg, name
        self.tokenizer, self.context = engine.tokenizer, engine.context

    def names(self, as_ids: bool) -> Name:
        """Token strings: decoded single tokens, or vLLM's ``token_id:{id}``."""
        if as_ids or self.tokenizer is None:
            return lambda i: f"token_id:{i}"
        return lambda i: self.tokenizer.decode([i])

    # ---- requests -> Ask
    def completion(self, req: CompletionRequest) -> Ask:
        self._model(req.model)
        k = self._logprobs(req.logprobs, "logprobs")
        max_tokens = min(COMPLETION_MAX_TOKENS, self.cfg.max_tokens) if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(
                400,
                "max_tokens 0 generates nothing; ask for at least 1 token, or set echo: true to score the prompt",
                "max_tokens",
            )
        self._max(max_tokens, "max_tokens")
        prompts = self._prompts(req.prompt)
        self._room(prompts, max_tokens, "prompt", "max_tokens")
        return Ask(prompts, req.n or 1, self._sampling(req, max_tokens, k), k, bool(req.echo), tuple(req.stop or ()))

    def chat(self, req: ChatRequest) -> Ask:
        self._model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        k = self._logprobs(req.top_logprobs or 0, "top_logprobs") if req.logprobs else None
        prompts = self._prompts([chat_prompt(self.tokenizer, req.messages)], "messages")
        param, asked = ("max_completion_tokens", req.max_completion_tokens)
        if asked is None:
            param, asked = "max_tokens", req.max_tokens
        if asked is None:  # as much as fits, up to the server's limit
            ids = prompts[0][1]
            asked = (
                self.cfg.max_tokens if self.context is None or ids is None else min(self.cfg.max_tokens, self.context - len(ids))
            )
            asked = max(asked, 1)  # a prompt that fills the context is refused by _room
        self._max(asked, param)
        self._room(prompts, asked, "messages", param)
        return Ask(prompts, req.n or 1, self._sampling(req, asked, k), k, False, tuple(req.stop or ()))

    def _model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404, f"The model '{model}' does not exist; this server serves '{self.name}'", "model", "model_not_found"
            )

    def _logprobs(self, k: int | None, param: str) -> int | None:
        if k is not None and k > self.cfg.max_logprobs:
            raise APIError(
                400,
                f"{param} {k} is above this server's limit of {self.cfg.max_logprobs} (serve.max_logprobs); ask for fewer",
                param,
            )
        return k

    def _max(self, max_tokens: int, param: str) -> None:
        if max_tokens > self.cfg.max_tokens:
            raise APIError(
                400, f"{param} {max_tokens} is above this server's limit of {self.cfg.max_tokens} (serve.max_tokens)", param
            )

    def _prompts(self, prompt: list, param: str = "prompt") -> list[tuple[str, list[int] | None]]:
        """(text, token ids) per prompt; ids are None for an engine without a tokenizer."""
        tok = self.tokenizer
        if isinstance(prompt[0], str):
            if tok is None:
                return [(p, None) for p in prompt]
            pairs = list(zip(prompt, encode(tok, prompt), strict=True))
        else:
            if tok is None:
                raise APIError(400, "this engine has no tokenizer, so prompts of token ids mean nothing to it; send text", param)
            size = len(tok)
            bad = [i for ids in prompt for i in ids if not 0 <= i < size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary (0..{size - 1})", param)
            pairs = [(tok.decode(ids), ids) for ids in prompt]
        if any(not ids for _, ids in pairs):
            raise APIError(400, f"{param} is empty (no tokens); send some text", param)
        return pairs

    def _room(self, prompts: list[tuple[str, list[int] | None]], max_tokens: int, what: str, param: str) -> None:
        """The prompt and the completion fit in the context (OpenAI's context_length_exceeded)."""
        for _, ids in prompts:
            if self.context is not None and ids is not None and len(ids) + max_tokens > self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                                    f"{len(ids) + max_tokens} tokens ({len(ids)} in the {what}, {max_tokens} in the completion). "
                                    f"Please reduce the length of the {what} or the completion.",
                               param if len(ids) < self.context else what, "context_length_exceeded")  # fmt: skip

    def _sampling(self, req, max_tokens: int, k: int | None) -> Sampling:
        """Greedy at temperature 0 (top_p then means nothing, so greedy requests share batches);
        the top-1 is always stored when log-probs are asked, so greedy tokens need no scoring."""
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None or temperature == 0 else req.top_p
        seed = self.cfg.seed if req.seed is None else req.seed
        return Sampling(
            temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, top_k=0 if k is None else max(k, 1), seed=seed
        )

    # ---- Ask -> answers
    async def answer(self, ask: Ask) -> tuple[list[Choice], int]:
        """The choices (prompt-major, n per prompt) and the prompt tokens used."""
        rows = await self._generate(ask) if ask.sampling.max_new_tokens else None
        choices = [self._choice(i, rows[i] if rows else None, ask) for i in range(len(ask.prompts) * ask.n)]
        if ask.k is not None and rows:
            await self._generated_logprobs(choices, rows, ask)
        elif ask.k is not None:
            for c in choices:
                c.tokens = []
        if ask.echo:
            await self._echo(choices, ask)
        known = [len(ids) for _, ids in ask.prompts if ids is not None]
        used = sum(known) if len(known) == len(ask.prompts) else sum(r.prompt_tokens for r in (rows or [])[:: ask.n])
        return choices, used

    async def _generate(self, ask: Ask) -> list[Completion]:
        """n completions per prompt; greedy ones are one completion n times (they are equal, and
        transformers refuses greedy search with several return sequences)."""
        greedy = ask.sampling.temperature == 0
        rows = await self.batcher.generate([text for text, _ in ask.prompts], 1 if greedy else ask.n, ask.sampling)
        return [row for row in rows for _ in range(ask.n)] if greedy else rows

    def _choice(self, index: int, row: Completion | None, ask: Ask) -> Choice:
        if row is None:  # echo with max_tokens 0: the prompt alone
            return Choice(index, "", [], 0, "length")
        ids, text, finish = row.token_ids, row.text, row.finish_reason
        parts = pieces(self.tokenizer, ids, text, skip_special=True) if ids is not None and self.tokenizer is not None else [text]
        count = len(ids) if ids is not None else row.completion_tokens
        cut = cut_at_stop(text, parts, list(ask.stops)) if ask.stops else None
        if cut is not None:
            text, parts, finish = cut[0], cut[1], "stop"
            count = len(parts) if ids is not None else count
        distil = row.extra.get("distil") if isinstance(row.extra, dict) else None
        return Choice(index, text, parts, count, finish, distil=distil if isinstance(distil, dict) else None)

    async def _generated_logprobs(self, choices: list[Choice], rows: list[Completion], ask: Ask) -> None:
        missing = []
        for c, row in zip(choices, rows, strict=True):
            if row.token_ids is None:
                raise APIError(
                    400,
                    "this engine returns text without token ids, so it has no log-probs to give; ask without logprobs",
                    "logprobs",
                )
            c.tokens = from_completion(row, c.count, ask.k)
            if c.tokens is None:
                missing.append((c, row.token_ids[: c.count]))
        if missing:  # sampled tokens outside the stored top-k: the engine scores them
            scored = await self.batcher.score(
                [ask.prompts[c.index // ask.n][1] for c, _ in missing], [ids for _, ids in missing], ask.k
            )
            for (c, ids), s in zip(missing, scored, strict=True):
                c.tokens = from_scored(ids, s, ask.k)

    async def _echo(self, choices: list[Choice], ask: Ask) -> None:
        """The prompt first in every choice; with log-probs, the engine's scores of its tokens
        (the first token has none: nothing predicts it)."""
        parts = [
            pieces(self.tokenizer, ids, text, skip_special=False) if ids is not None else [text] for text, ids in ask.prompts
        ]
        tokens: list[list[Token] | None] = [None] * len(ask.prompts)
        if ask.k is not None:
            if any(ids is None for _, ids in ask.prompts):
                raise APIError(
                    400, "this engine has no tokenizer, so it cannot score an echoed prompt; ask without logprobs", "echo"
                )
            scored = await self.batcher.score([ids[:1] for _, ids in ask.prompts], [ids[1:] for _, ids in ask.prompts], ask.k)
            tokens = [
                [Token(ids[0], None, None), *from_scored(ids[1:], s, ask.k)]
                for (_, ids), s in zip(ask.prompts, scored, strict=True)
            ]
        for c in choices:
            i = c.index // ask.n
            c.prompt_text, c.prompt_pieces, c.prompt_tokens = ask.prompts[i][0], parts[i], tokens[i]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens: through the Rust tokenizer directly when
    there is one (the same ids as ``tokenizer(texts)``, without its per-call Python overhead,
    which the event loop would pay on every request)."""
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:
        return [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
