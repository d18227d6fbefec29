"""The one ``Teacher`` protocol every LM teacher backend implements (ARCHITECTURE.md,
"Teachers are an interface, not a code path").

A teacher (a) generates n completions per prompt with per-token top-k log-probs, the
finish reason and token usage, and (b) scores given completions token by token.
Generate-teacher-data, on-policy distillation, cascades and ``distil serve`` call these
two operations only; the backends (``transformers_backend``, ``http``, ``vllm``) differ
in where the model runs, never in what they return.

Token ids in a ``Completion`` are ids of ``Teacher.tokenizer`` when the backend knows them
(``token_ids`` is None when it does not: an HTTP server whose tokenizer differs from the
local one returns text only, which suits ``sft`` but no token-level method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How to sample: temperature 0 is greedy; ``top_k`` log-probs are stored per token
    (of the untempered distribution); ``seed`` fixes the draw of one generate call."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    top_k: int = 0
    seed: int = 0


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``topk_ids`` / ``topk_logprobs`` are flat, ``len(token_ids) * k`` values (token-major),
    the teacher's k most likely tokens at each generated position, sorted by log-prob;
    ``k`` is the number actually stored (a server may give fewer than asked). The log-probs
    stay float32 up to the teacher-data writer, which quantises them (``stages.lm.topk_codec``)."""

    text: str
    token_ids: list[int] | None
    seq_logprob: float | None
    topk_ids: list[int] = field(default_factory=list)
    topk_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    k: int = 0
    finish_reason: str = "length"
    """"stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)"""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """backend-specific per-row data the teacher-data table stores (MoE routing)"""


@dataclass
class Scored:
    """The teacher's view of given completion tokens: per token the log-prob of the given
    token (``logprobs`` [n]) and the teacher's top-k there (``topk_ids`` / ``topk_logprobs``
    [n, k], sorted)."""

    logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


@runtime_checkable
class Teacher(Protocol):
    """What every LM teacher backend provides.

    ``identity``: what manifests record (backend, path or URL and model name, content hash
    when local; never a secret). ``tokenizer``: the local tokenizer its token ids refer to,
    or None when they are unknown (text only). ``context``: its context length, or None."""

    identity: dict
    tokenizer: Any
    context: int | None

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        """``n`` completions per prompt, prompt-major (row i is prompt i // n)."""
        ...

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int) -> list[Scored]:
        """Per pair, the teacher's log-probs of the completion tokens after the prompt."""
        ...

    def close(self) -> None:
        """Release the model or connection."""
        ...


def finish_reason(ids: list[int], eos: int | None, max_new_tokens: int) -> str:
    """OpenAI's finish reason of a completion cut after its first eos: "stop" when it ended
    on eos (or stopped early), "length" when it used every new token."""
    if eos is not None and ids and ids[-1] == eos:
        return "stop"
    return "length" if len(ids) >= max_new_tokens else "stop"
