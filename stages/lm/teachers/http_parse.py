"""OpenAI response bodies -> ``Completion`` / ``Scored``, for the HTTP teacher.

Formats (OpenAI API reference; vLLM "OpenAI-compatible server"):
- completions: ``choices[i] = {"index", "text", "finish_reason", "logprobs": {"tokens",
  "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"} | null}``; with
  ``echo`` the logprobs cover the prompt too, the first entry's logprob and top-k null;
- chat: ``choices[i] = {"index", "message": {"content"}, "finish_reason", "logprobs":
  {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob"}]}]} | null}``;
- vLLM: ``return_tokens_as_token_ids`` spells every token ``token_id:N``; ``prompt_logprobs``
  is ``[null | {"<id>": {"logprob", "rank", "decoded_token"}}]`` over the prompt.

Each ``Completion`` carries its own ``k``: the fewest mappable alternatives any of its
positions got, capped at the k asked (servers may give fewer, vLLM adds the sampled token
as a k+1-th); the caller stores the minimum over its rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from stages.errors import DistilError
from stages.lm.teachers.base import Completion, Scored
from stages.lm.teachers.http_client import Malformed

TOKEN_ID = "token_id:"


class TokenMap:
    """Server token strings -> ids of the local tokenizer: ``token_id:N`` is N; any other
    string is looked up in a table of ``tokenizer.decode([id])``, kept to the strings that
    exactly one id decodes to (built on first use)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.size, self._table = tokenizer, len(tokenizer), None

    def id_of(self, token: str) -> int | None:
        if token.startswith(TOKEN_ID):
            tail = token[len(TOKEN_ID) :]
            return int(tail) if tail.isascii() and tail.isdigit() and int(tail) < self.size else None
        if self._table is None:
            strings = self.tokenizer.batch_decode([[i] for i in range(self.size)], clean_up_tokenization_spaces=False)
            count = Counter(strings)
            self._table = {s: i for i, s in enumerate(strings) if count[s] == 1}
        return self._table.get(token)

    def decodes_to(self, ids: list[int], text: str) -> bool:
        """Whether ``ids`` spell ``text`` (servers drop special tokens from the text, or keep them)."""
        decode = self.tokenizer.decode
        return any(decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == text for skip in (False, True))


@dataclass
class Choice:
    """One choice in either format: ``tokens`` None when it came without logprobs."""

    index: int
    text: str
    finish_reason: str
    tokens: list[str] | None
    logprobs: list
    alternatives: list[list[tuple[str, float]]]


def completion_choice(c: dict, position: int) -> Choice:
    text, lp = c["text"], c.get("logprobs")
    if not isinstance(text, str):
        raise Malformed("a choice's text is not a string")
    if not isinstance(lp, dict) or lp.get("tokens") is None:
        return Choice(c.get("index", position), text, c.get("finish_reason") or "stop", None, [], [])
    tokens, chosen = lp["tokens"], lp["token_logprobs"]
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    if not len(tokens) == len(chosen) == len(tops):
        raise Malformed(f"logprobs hold {len(tokens)} tokens, {len(chosen)} token_logprobs and {len(tops)} top_logprobs")
    return Choice(c.get("index", position), text, c.get("finish_reason") or "stop", list(tokens), list(chosen),
                  [list(d.items()) if d else [] for d in tops])  # fmt: skip


def chat_choice(c: dict, position: int) -> Choice:
    text, lp = c["message"].get("content") or "", c.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if content is None:
        return Choice(c.get("index", position), text, c.get("finish_reason") or "stop", None, [], [])
    return Choice(c.get("index", position), text, c.get("finish_reason") or "stop", [e["token"] for e in content],
                  [e["logprob"] for e in content],
                  [[(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []] for e in content])  # fmt: skip


def choices_of(payload: dict, n: int, chat: bool) -> list[Choice]:
    """The ``n`` choices of one response, by index."""
    raw = payload["choices"]
    if not isinstance(raw, list) or len(raw) != n:
        raise Malformed(f"expected {n} choices, got {len(raw) if isinstance(raw, list) else type(raw).__name__}")
    parse = chat_choice if chat else completion_choice
    choices = sorted((parse(c, i) for i, c in enumerate(raw)), key=lambda c: c.index)
    if [c.index for c in choices] != list(range(n)):
        raise Malformed(f"choice indices {[c.index for c in choices]} are not 0..{n - 1}")
    return choices


def ranked(alternatives: list[tuple[str, float]], tokens: TokenMap) -> list[tuple[float, int]]:
    """(logprob, id) of the mappable alternatives, best first, one entry per id."""
    best: dict[int, float] = {}
    for token, lp in alternatives:
        i = tokens.id_of(token)
        if i is not None and lp is not None and i not in best:
            best[i] = float(lp)
    return sorted(((lp, i) for i, lp in best.items()), key=lambda pair: -pair[0])


def token_ids(choice: Choice, tokens: TokenMap) -> tuple[list[int] | None, str | None]:
    """The choice's ids when every token maps to one and they decode to its text, else (None, why)."""
    if choice.tokens is None:
        return None, "the server returned no tokens (no logprobs were asked or given)"
    ids = []
    for token in choice.tokens:
        i = tokens.id_of(token)
        if i is None:
            return None, f"the server's token {token!r} has no single id in the local tokenizer"
        ids.append(i)
    if not tokens.decodes_to(ids, choice.text):
        return None, "the local tokenizer decodes the server's tokens to another text than the server returned"
    return ids, None


def to_completion(choice: Choice, top_k: int, tokens: TokenMap | None, prompt_tokens: int, share: int) -> tuple[Completion, str | None]:
    """A ``Completion`` and, when its token ids are unknown though ``tokens`` is given, why.
    ``share``: its completion tokens when the choice has no tokens (usage split over n)."""
    chosen = choice.logprobs
    seq = float(sum(chosen)) if choice.tokens is not None and all(lp is not None for lp in chosen) else None
    ids, why = token_ids(choice, tokens) if tokens is not None else (None, None)
    k, top_ids, top_lps = 0, [], []
    if ids is not None and top_k:
        rows = [ranked(alts, tokens) for alts in choice.alternatives]
        k = min([top_k, *(len(r) for r in rows)])
        top_ids = [i for r in rows for _, i in r[:k]]
        top_lps = [lp for r in rows for lp, _ in r[:k]]
    return Completion(
        text=choice.text, token_ids=ids, seq_logprob=seq, topk_ids=top_ids, topk_logprobs=np.array(top_lps, np.float32), k=k,
        finish_reason="length" if choice.finish_reason == "length" else "stop", prompt_tokens=prompt_tokens,
        completion_tokens=len(choice.tokens) if choice.tokens is not None else share,
    ), why  # fmt: skip


def to_scored(payload: dict, prompt_len: int, completion: list[int], top_k: int, tokens: TokenMap) -> Scored:
    """The completion positions of an echoed scoring response (``logprobs`` or vLLM's ``prompt_logprobs``)."""
    choice = payload["choices"][0]
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and lp.get("tokens") is not None:
        rows = echo_rows(lp, prompt_len, completion, tokens)
    elif choice.get("prompt_logprobs") is not None:
        rows = prompt_logprob_rows(choice["prompt_logprobs"], prompt_len, completion)
    else:
        raise DistilError(
            "the teacher server returned no echoed log-probs, so it cannot score completions; "
            "use a server that answers echo with logprobs (vLLM, distil serve)"
        )
    k = min([top_k, *(len(r) for _, r in rows)]) if top_k else 0
    n = len(rows)
    return Scored(
        logprobs=np.array([c for c, _ in rows], np.float32),
        topk_ids=np.array([[i for _, i in r[:k]] for _, r in rows], np.int64).reshape(n, k),
        topk_logprobs=np.array([[v for v, _ in r[:k]] for _, r in rows], np.float32).reshape(n, k),
    )


def echo_rows(lp: dict, prompt_len: int, completion: list[int], tokens: TokenMap) -> list[tuple[float, list]]:
    names, chosen = lp["tokens"], lp["token_logprobs"]
    tops = lp.get("top_logprobs") or [None] * len(names)
    total = prompt_len + len(completion)
    if min(len(names), len(chosen), len(tops)) < total:
        raise Malformed(f"the echo covers {min(len(names), len(chosen), len(tops))} of the {total} tokens sent")
    rows = []
    for pos, want in enumerate(completion, start=prompt_len):
        got = tokens.id_of(names[pos])
        if got is not None and got != want:
            raise DistilError(
                f"the teacher server echoed token {names[pos]!r} (id {got}) where id {want} was sent: its tokenizer differs from "
                "teacher.tokenizer, and scoring needs the same tokenizer"
            )
        if chosen[pos] is None:
            raise Malformed(f"no log-prob at echoed position {pos}")
        rows.append((float(chosen[pos]), ranked(list((tops[pos] or {}).items()), tokens)))
    return rows


def prompt_logprob_rows(entries: list, prompt_len: int, completion: list[int]) -> list[tuple[float, list]]:
    if len(entries) < prompt_len + len(completion):
        raise Malformed(f"prompt_logprobs cover {len(entries)} of the {prompt_len + len(completion)} tokens sent")
    rows = []
    for pos, want in enumerate(completion, start=prompt_len):
        entry = entries[pos]
        alts = sorted(((float(v["logprob"]), int(key)) for key, v in entry.items()), key=lambda pair: -pair[0])
        rows.append((float(entry[str(want)]["logprob"]), alts))
    return rows
