"""Models run as agents (``agent.tool: python``): the decoding callbacks ``trajectory.act``
takes, for a model in process (``evaluate``) and for any ``Teacher`` (``generate-teacher-data``),
and ``AgentTeacher``, a Teacher whose completions are whole trajectories.

A round's text is cut after the first stop string it writes (``Observation:`` after a code
line, a newline for the final answer), so every backend works, one that knows stop strings or
not. The first-thought prefix (Kang et al. 2025, section 3.2) starts each trajectory with the
model's own first thought, written before the tool format steers it: the ``Thought:`` line is
sampled alone, then the agent continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.config import AgentConfig
from stages.lm.agent.sandbox import Limits
from stages.lm.agent.trajectory import THOUGHT, Trajectory, act
from stages.lm.teachers import Completion, Sampling


def limits(cfg: AgentConfig) -> Limits:
    return Limits(seconds=cfg.seconds, memory_mb=cfg.memory_mb)


def cut(text: str, stop: str) -> str:
    """``text`` up to and including the first ``stop`` (all of it without one)."""
    at = text.find(stop)
    return text if at < 0 else text[: at + len(stop)]


@dataclass
class Decoder:
    """``generate(texts, n, stop)`` for ``act`` over ``complete(texts, n, temperature,
    max_new_tokens) -> n texts per input, input-major``: one candidate at ``temperature`` (0 =
    greedy), several (self-consistent actions) at the agent's own temperature; the final answer
    (stop = newline) gets ``answer_tokens``."""

    complete: object
    cfg: AgentConfig
    temperature: float
    answer_tokens: int

    def __call__(self, texts: list[str], n: int, stop: str) -> list[str]:
        tokens = self.answer_tokens if stop == "\n" else self.cfg.round_tokens
        temperature = self.temperature if n == 1 else self.cfg.temperature
        return [cut(t, stop) for t in self.complete(texts, n, temperature, tokens)]


def solve(decoder: Decoder, prompts: list[str], cfg: AgentConfig) -> list[Trajectory]:
    """Each prompt's trajectory (with the first-thought prefix when ``cfg.first_thought``)."""
    prefixes = None
    if cfg.first_thought:
        thoughts = decoder([p + " " + THOUGHT for p in prompts], 1, "\n")
        prefixes = [f" {THOUGHT}{t.rstrip()}\n" for t in thoughts]  # a trajectory starts with its separator
    return act(decoder, prompts, max_calls=cfg.max_calls, samples=cfg.samples, limits=limits(cfg), prefixes=prefixes)


def model_completer(model, tokenizer, device, batch_size: int = 64):
    """``complete`` for a transformers model in process (``stages.lm.generation.sample``), in batches."""
    from stages.lm.generation import sample

    def complete(texts: list[str], n: int, temperature: float, max_new_tokens: int) -> list[str]:
        out = []
        step = max(1, batch_size // n)
        for i in range(0, len(texts), step):
            rows = sample(model, tokenizer, texts[i : i + step], samples=n, temperature=temperature, top_p=1.0,
                          max_new_tokens=max_new_tokens, top_k=0, device=device)  # fmt: skip
            out += [r["completion"] for r in rows]
        return out

    return complete


class AgentTeacher:
    """A ``Teacher`` whose completions are agent trajectories of the wrapped teacher: text only
    (the tool wrote the observations, so there are no teacher log-probs of the whole text), the
    final answer and the number of tool calls in ``extra``. Round r of a part samples with seed
    ``seed + r``, so a resumed part samples what it did before."""

    def __init__(self, teacher, cfg: AgentConfig):
        self.teacher, self.cfg = teacher, cfg
        self.identity, self.context = teacher.identity, getattr(teacher, "context", None)
        self.tokenizer = None

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Completion]:
        calls = {"round": 0}

        def complete(texts, m, temperature, max_new_tokens):
            calls["round"] += 1
            s = Sampling(temperature=temperature, top_p=sampling.top_p, max_new_tokens=max_new_tokens, top_k=0,
                         seed=sampling.seed + calls["round"])  # fmt: skip
            return [c.text for c in self.teacher.generate(texts, m, s)]

        decoder = Decoder(complete, self.cfg, sampling.temperature, sampling.max_new_tokens)
        trajectories = solve(decoder, [p for p in prompts for _ in range(n)], self.cfg)
        return [Completion(text=t.text, token_ids=None, seq_logprob=None, finish_reason="stop",
                           extra={"answer": t.answer, "tool_calls": t.tool_calls}) for t in trajectories]  # fmt: skip

    def score(self, prompt_ids, completion_ids, top_k):
        return self.teacher.score(prompt_ids, completion_ids, top_k)

    def close(self) -> None:
        self.teacher.close()
