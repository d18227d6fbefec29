"""Agent trajectories (Kang et al., "Distilling LLM Agent into Small Models with Retrieval and Code
Tools", 2025): a model answers by thinking, writing code, reading the tool's observation and
answering, and a student learns the whole trajectory. The text layout, one field per line:

    Thought: <why code helps>
    Code: <one Python snippet, ``;`` between statements>
    Observation: <what the sandbox printed>
    Answer: <the final answer>

The model writes everything but the observations, which the tool writes (``sandbox.run``); a
trajectory may hold several Code / Observation rounds before its answer. ``encode`` masks the
observations out of the loss (the student learns to call the tool, not to predict its output);
``act`` runs a model as an agent over a batch of prompts, and with ``samples`` > 1 it is the
paper's self-consistent action generation: each round samples several code candidates, runs
them all and continues with the observation most of the runnable ones agree on.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from stages.lm.agent.sandbox import Limits, run

THOUGHT, CODE, OBSERVATION, ANSWER = "Thought:", "Code:", "Observation:", "Answer:"
_EXPRESSION = re.compile(r"(-?\d[\d\s+\-*/()]*\d\)?)\s*=\s*\??\s*$")


@dataclass
class Step:
    code: str
    observation: str
    ok: bool


@dataclass
class Trajectory:
    text: str = ""
    """Everything after the prompt, the observations included."""
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None

    @property
    def tool_calls(self) -> int:
        return len(self.steps)


def expression(prompt: str) -> str | None:
    """The arithmetic expression a question ends with ("... 41234 + 50023 - 812 ="), or None."""
    for line in reversed(prompt.strip().splitlines()):
        found = _EXPRESSION.search(line)
        if found:
            return re.sub(r"\s+", " ", found.group(1)).strip()
    return None


def gold(prompt: str, answer: str, limits: Limits = Limits()) -> str | None:
    """A verified trajectory for an arithmetic question: code that prints its expression, the
    sandbox's observation, and the answer, when the observation is the gold answer (else None)."""
    expr = expression(prompt)
    if expr is None:
        return None
    code = f"print({expr})"
    obs = run(code, limits)
    if not obs.ok or obs.text.strip() != str(answer).strip():
        return None
    return render("the numbers are large, so I use the tool", [(code, obs.text.strip())],
                  obs.text.strip())  # fmt: skip


def gold_cot(prompt: str, answer: str) -> str | None:
    """The plain chain-of-thought of a sum-and-difference question, the baseline a tool-using
    student is compared with: the running result after each term, then the answer
    ("Thought: 41234 + 50023 = 91257. 91257 - 812 = 90445." / "Answer: 90445"). None when the
    question has no such expression or its result is not the gold answer."""
    expr = expression(prompt)
    terms = re.findall(r"[+-]|\d+", expr.replace(" ", "")) if expr else []
    if len(terms) < 3 or not terms[0].isdigit() and not (terms[0] == "-" and terms[1].isdigit()):
        return None
    if terms[0] == "-":
        terms = ["-" + terms[1], *terms[2:]]
    total, steps = int(terms[0]), []
    for op, num in zip(terms[1::2], terms[2::2], strict=False):
        if op not in "+-" or not num.isdigit():
            return None
        new = total + int(num) if op == "+" else total - int(num)
        steps.append(f"{total} {op} {num} = {new}.")
        total = new
    if str(total) != str(answer).strip():
        return None
    return f"{THOUGHT} {' '.join(steps)}\n{ANSWER} {total}"


def render(thought: str, steps: list[tuple[str, str]], answer: str) -> str:
    lines = [f"{THOUGHT} {thought}"]
    for code, obs in steps:
        lines += [f"{CODE} {code}", f"{OBSERVATION} {obs}"]
    return "\n".join([*lines, f"{ANSWER} {answer}"])


def observation_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the observations' contents (after ``Observation:`` up to the line end)."""
    spans = []
    for m in re.finditer(rf"^{OBSERVATION}(.*)$", text, flags=re.MULTILINE):
        spans.append((m.start(1), m.end(1)))
    return spans


def encode(tokenizer, prompt: str, trajectory: str, max_len: int, ignore: int = -100) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + " " + trajectory + eos, labels IGNORE on the prompt and on every
    token that overlaps an observation (the tool wrote those)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    body = " " + trajectory.lstrip()  # the separator is part of the first completion token, as the model generates it
    enc = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    spans = observation_spans(body)
    labels = [ignore if any(s < e2 and s2 < e for s2, e2 in spans) else t
              for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]  # fmt: skip
    ids = (p + enc["input_ids"] + [tokenizer.eos_token_id])[:max_len]
    return ids, ([ignore] * len(p) + labels + [tokenizer.eos_token_id])[:max_len]


def code_of(text: str) -> str | None:
    """The last ``Code:`` line's snippet of a generated text (``;`` joins statements), or None."""
    found = re.findall(rf"^\s*{CODE}\s?(.*)$", text, flags=re.MULTILINE)
    return found[-1].replace("; ", "\n").replace(";", "\n").strip() if found else None


def answer_of(text: str) -> str | None:
    found = re.findall(rf"^\s*{ANSWER}\s?(.*)$", text, flags=re.MULTILINE)
    return found[-1].strip() if found else None


def act(generate, prompts: list[str], *, max_calls: int = 2, samples: int = 1, limits: Limits = Limits(),
        prefixes: list[str] | None = None) -> list[Trajectory]:  # fmt: skip
    """Run an agent over ``prompts``. ``generate(texts, n, stop)`` continues each text with ``n``
    samples (greedy when n = 1), each cut after the first ``stop`` string it writes. Each round the
    model writes up to an ``Observation:``; a ``Code:`` line there is run by the sandbox and its
    observation appended; with ``samples`` > 1 the round's n candidates all run and the most
    common successful observation (the first candidate that gave it) is kept. A round that ends
    without code, or an ``Answer:`` line, ends the trajectory; after ``max_calls`` tool calls the
    model is asked for its answer. ``prefixes`` (one per prompt) start the trajectories: the
    model continues them (the first-thought prefix, ``stages.lm.agent.runner.solve``)."""
    out = [Trajectory(text=p) for p in (prefixes or [""] * len(prompts))]
    open_ = list(range(len(prompts)))
    for _ in range(max_calls):
        if not open_:
            break
        texts = [prompts[i] + out[i].text for i in open_]  # the text starts with its separator, as the model wrote it
        drafts = generate(texts, samples, OBSERVATION)
        still = []
        for j, i in enumerate(open_):
            cands = drafts[j * samples : (j + 1) * samples]
            chosen = _choose(cands, limits)
            if chosen is None:  # no code: the model answered (or gave up) without the tool
                draft = cands[0]
                out[i].text += draft[: draft.rfind(OBSERVATION)] if draft.rstrip().endswith(OBSERVATION) else draft
                continue
            draft, step = chosen
            head = draft[: draft.rfind(OBSERVATION)] if OBSERVATION in draft else draft.rstrip() + "\n"
            out[i].text += head + f"{OBSERVATION} {step.observation}\n"
            out[i].steps.append(step)
            still.append(i)
        open_ = still
    if open_:
        finals = generate([prompts[i] + out[i].text + ANSWER for i in open_], 1, "\n")
        for i, f in zip(open_, finals, strict=True):
            out[i].text += ANSWER + f
    for t in out:
        t.answer = answer_of(t.text)
    return out


def _choose(cands: list[str], limits: Limits) -> tuple[str, Step] | None:
    """The candidate whose code ran and agrees with most others' observations; None without code."""
    runs = []
    for c in cands:
        if answer_of(c) is not None and OBSERVATION not in c:
            continue
        code = code_of(c)
        if code is not None:
            obs = run(code, limits)
            runs.append((c, Step(code, obs.text.strip().replace("\n", " "), obs.ok)))
    if not runs:
        return None
    good = [r for r in runs if r[1].ok] or runs
    top, _ = Counter(r[1].observation for r in good).most_common(1)[0]
    return next(r for r in good if r[1].observation == top)
