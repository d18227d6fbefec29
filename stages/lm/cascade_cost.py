"""Cost accounting of language-model cascades: prices, FLOPs, break-even, the
accuracy-versus-cost threshold sweep that calibrates a cascade on dev, seeded generation
(``stages.lm.generation.sample``) that measures answers, tokens and seconds per query, and
the flat metrics of a run.

Every model is costed per query from its own tokens (its own tokenizer: cascades exchange
only text). With a price table (``cascade.costs``: ``{name: {input: p, output: p}}`` in
price per 1k tokens) cost is money; without one it is FLOPs, ~2 x parameters x tokens
(Kaplan et al., 2020). Mixing the two units is refused. A prompt is counted once per
generate call: the samples of one call share it (a KV-cache prefix, or an API's ``n``),
while adaptive sampling pays it again each round it draws a sample.
"""

from __future__ import annotations

import csv
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from stages import modality
from stages.errors import DistilError
from stages.tasks.reasoning import extract_answer


@dataclass(frozen=True)
class Pricer:
    """Cost of ``prompt`` + ``completion`` tokens for one model."""

    name: str
    params: int
    input: float | None = None
    """price per 1k prompt tokens; None = cost in FLOPs"""
    output: float | None = None
    """price per 1k completion tokens"""

    def __call__(self, prompt_tokens: ArrayLike, completion_tokens: ArrayLike) -> np.ndarray:
        p, c = np.asarray(prompt_tokens, dtype=np.float64), np.asarray(completion_tokens, dtype=np.float64)
        if self.input is None or self.output is None:
            return 2.0 * self.params * (p + c)
        return (p * self.input + c * self.output) / 1000.0


def pricers(costs: dict, params: dict[str, int | None]) -> tuple[dict[str, Pricer], str]:
    """One ``Pricer`` per model name in ``params`` (name -> parameter count) and the unit
    ("price" or "flops"). Every model is priced or none is."""
    unknown = sorted(set(costs) - set(params))
    if unknown:
        raise DistilError(f"costs name unknown model(s) {', '.join(unknown)}; price {', '.join(params)}")
    table = {}
    for name, entry in costs.items():
        ok = isinstance(entry, dict) and set(entry) == {"input", "output"}
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in entry.values())
        if not ok:
            raise DistilError(f"costs.{name} must be {{input: PRICE, output: PRICE}} per 1k tokens (numbers >= 0), got {entry!r}")
        table[name] = (float(entry["input"]), float(entry["output"]))
    if table and set(table) != set(params):
        missing = ", ".join(n for n in params if n not in table)
        raise DistilError(
            f"costs price {', '.join(table)} but not {missing}; price every model the cascade runs, or none (FLOPs)"
        )
    unknown_size = [n for n, p in params.items() if p is None]
    if unknown_size and not table:
        raise DistilError(
            f"{', '.join(unknown_size)} runs behind an API, so its cost in FLOPs is unknown; price every model in cascade.costs"
        )
    out = {n: Pricer(n, p or 0, *table.get(n, (None, None))) for n, p in params.items()}
    return out, "price" if table else "flops"


def break_even(bank_cost: float, teacher_per_query: float, cascade_per_query: float) -> float | None:
    """Queries after which the bank's cost is paid back by the per-query saving over the
    teacher alone; None when the cascade saves nothing (it never pays back)."""
    saving = teacher_per_query - cascade_per_query
    if saving <= 0:
        return None
    return float(bank_cost / saving)


def sweep(
    thresholds: np.ndarray,
    keep: np.ndarray,
    s_score: np.ndarray,
    t_score: np.ndarray,
    cost: np.ndarray,
    samples: np.ndarray,
    teacher_cost: float,
    *,
    target: float | None,
    margin: float | None,
    budget: float = 0.0,
    level: float = 0.0,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[int, list[dict]]:
    """The chosen threshold's index and the whole dev curve.

    ``keep`` [T, N]: the student keeps query n at threshold t; ``s_score`` / ``t_score``
    [N]: student and teacher scores (NaN without gold); ``cost`` and ``samples`` [T, N]:
    the cascade's cost and student samples per query at each threshold; ``teacher_cost``:
    teacher-only cost of the whole dev split. With ``budget`` > 0 the most accurate
    threshold whose cost is at most ``budget`` x teacher-only wins; otherwise the cheapest
    that meets the target (``target`` absolute, or ``margin`` below the teacher's accuracy),
    and the last threshold (always defer) when none does. With ``level`` > 0 the target must
    hold in that share of Poisson bootstrap resamples (paired with the teacher's), the
    classifier cascade's rule."""
    if (target is None) == (margin is None):
        raise ValueError("sweep needs exactly one of target and margin")
    scored = ~np.isnan(s_score) & ~np.isnan(t_score)
    if not scored.any():
        raise DistilError("no dev query has a gold answer to score; add answers to the dev split or pass a threshold")
    s, t = np.nan_to_num(s_score), np.nan_to_num(t_score)
    picked = np.where(keep, s, t) * scored  # [T, N]
    n = int(scored.sum())
    weights = np.ones((1, len(s)))
    if level > 0:
        weights = np.random.default_rng(seed).poisson(1.0, size=(resamples, len(s))).astype(np.float64)
    weights = weights * scored
    total = weights.sum(1, keepdims=True).clip(min=1)
    acc_r = weights @ picked.T / total  # [R, T]
    goal = (weights @ (t * scored))[:, None] / total - margin if margin is not None else target
    met = (acc_r >= goal - 1e-12).mean(0)
    accuracy = picked.sum(1) / n
    total_cost = cost.sum(1)
    ratio = total_cost / teacher_cost if teacher_cost > 0 else np.full(len(thresholds), np.inf)
    curve = [
        {"threshold": float(thresholds[j]), "accuracy": float(accuracy[j]), "cost": float(total_cost[j]),
         "cost_vs_teacher": float(ratio[j]), "teacher_rate": float((~keep[j]).mean()),
         "samples_per_query": float(samples[j].mean()), "target_met": float(met[j])}
        for j in range(len(thresholds))
    ]  # fmt: skip
    return _choose(thresholds, accuracy, total_cost, ratio, met, budget=budget, level=level), curve


def _choose(thresholds, accuracy, total_cost, ratio, met, *, budget: float, level: float) -> int:
    """``sweep``'s pick from the curve: within ``budget`` the most accurate, else the cheapest
    threshold meeting the target (ties: more accurate, then lower); always defer if none."""
    order = range(len(thresholds))
    if budget > 0:
        fits = [j for j in order if ratio[j] <= budget + 1e-12]
        if not fits:
            raise DistilError(f"no threshold keeps the dev cost within budget {budget} of teacher-only "
                              f"(cheapest: {ratio.min():.3f}); raise budget")  # fmt: skip
        return min(fits, key=lambda j: (-accuracy[j], total_cost[j], thresholds[j]))
    needed = level if level > 0 else 1.0
    passing = [j for j in order if met[j] >= needed - 1e-12]
    if not passing:
        return len(thresholds) - 1
    return min(passing, key=lambda j: (total_cost[j], -accuracy[j], thresholds[j]))


# ---- measured generation ------------------------------------------------------------------


@dataclass
class LM:
    """A model of the cascade: a ``Teacher``-protocol backend (in process or served), its
    price and context length."""

    name: str
    teacher: Any
    pricer: Pricer
    context: int | None

    @property
    def tokenizer(self):
        return self.teacher.tokenizer


@dataclass
class Draw:
    """Per prompt: parsed answers and completion tokens per sample, prompt tokens, seconds."""

    answers: list[list[str | None]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)
    completion_tokens: list[list[int]] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


class Sampler:
    """Batched generation through ``Teacher.generate`` with a seed per generate call: a run
    makes the same calls in the same order, so it is reproducible, and dev and test draw
    from separate seed streams.

    With ``per_query`` each prompt is generated alone, seeded by the model, the prompt and
    the caller's ``round`` (adaptive sampling's draws of one query): a query's samples then
    depend on nothing else in the run (a repeated prompt gets the same samples), so ``distil
    serve`` of a calibrated policy answers each query as the offline run did."""

    def __init__(self, *, seed: int, stream: int, batch_size: int, top_p: float, max_new_tokens: int,
                 device: torch.device | str = "cpu", per_query: bool = False):  # fmt: skip
        self.base, self.calls = seed * 1_000_003 + stream * 100_003, 0
        self.batch_size, self.top_p, self.max_new_tokens, self.device = batch_size, top_p, max_new_tokens, device
        self.per_query = per_query

    def _calls(self, model: str, prompts: list[str], samples: int, round_: int):
        """(prompts of one generate call, its seed) in order."""
        if self.per_query:
            for p in prompts:
                key = zlib.crc32(f"{model}\0{p}".encode())  # each model its own stream
                yield [p], (self.base + key * 1009 + round_) % 2**62
            return
        per_call = max(1, self.batch_size // samples)
        for lo in range(0, len(prompts), per_call):
            self.calls += 1
            yield prompts[lo : lo + per_call], self.base + self.calls - 1

    def draw(self, lm: LM, prompts: list[str], samples: int, temperature: float, round_: int = 0) -> Draw:
        from stages.lm.teachers import Sampling

        out = Draw()
        lengths = [len(ids) for ids in lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts and lm.tokenizer else []
        if lm.context and lengths and max(lengths) + self.max_new_tokens > lm.context:
            raise DistilError(
                f"{lm.name} prompts reach {max(lengths)} tokens + {self.max_new_tokens} new, beyond its context of "
                f"{lm.context}; lower demos or max_new_tokens"
            )
        for chunk, seed in self._calls(lm.name, prompts, samples, round_):
            t0 = time.perf_counter()
            sampling = Sampling(temperature=temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, top_k=0, seed=seed)
            done = lm.teacher.generate(chunk, samples, sampling)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for j in range(len(chunk)):
                mine = done[j * samples : (j + 1) * samples]
                out.answers.append([extract_answer(c.text)[0] for c in mine])
                out.texts.append([c.text for c in mine])
                out.completion_tokens.append([c.completion_tokens for c in mine])
                out.prompt_tokens.append(mine[0].prompt_tokens)
                out.seconds.append(seconds)
        if lengths:
            out.prompt_tokens = lengths
        return out


def load_model(spec: Path | str, name: str, device: torch.device | str, teacher_cfg) -> tuple[Any, int | None]:
    """(a ``Teacher``-protocol backend, parameter count or None when served) of an LM; a
    classifier is refused."""
    from stages.lm.teachers import is_url, open_teacher

    if not is_url(spec) and modality.of_model(spec) not in (None, modality.LM):
        raise DistilError(f"{name} {spec} is not a language model (a classifier?); an LM cascade needs transformers LMs")
    backend = open_teacher(spec, teacher_cfg, device)
    return backend, getattr(backend, "parameters", None)


# ---- reporting -----------------------------------------------------------------------------

CURVE_COLUMNS = ["threshold", "accuracy", "cost", "cost_vs_teacher", "teacher_rate", "samples_per_query", "target_met"]


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarise(records: list[dict], *, policy: str, threshold: float | None, teacher_cost: ArrayLike, teacher_seconds: ArrayLike, unit: str,
              samples: int) -> dict:  # fmt: skip
    """Flat test metrics of a cascade from its decision records (``_s`` / ``_t``: the
    student's and the teacher's scores on each query, None without gold)."""
    n = len(records)
    kept = [r for r in records if r["route"] == "student"]
    cost, t_only = float(np.sum([r["cost"] for r in records])), float(np.sum(teacher_cost))
    seconds, t_seconds = float(np.sum([r["seconds"] for r in records])), float(np.sum(teacher_seconds))
    return {
        "policy": policy, "threshold": threshold, "queries": n,
        "accuracy": _mean(r["score"] for r in records), "teacher_rate": 1.0 - len(kept) / n,
        "student_accuracy": None if policy == "teacher" else _mean(r["_s"] for r in records),
        "teacher_accuracy": _mean(r["_t"] for r in records),
        "kept_accuracy": _mean(r["score"] for r in kept), "teacher_accuracy_on_kept": _mean(r["_t"] for r in kept),
        "unparsed_share": sum(r["answer"] is None for r in records) / n,
        "cost": cost, "cost_unit": unit, "cost_per_query": cost / n, "teacher_only_cost": t_only,
        "cost_vs_teacher": cost / t_only if t_only > 0 else None, "seconds": seconds,
        "seconds_vs_teacher": seconds / t_seconds if t_seconds > 0 else None,
        "samples": samples, "samples_per_query": float(np.mean([r["samples_used"] for r in records])),
        "demos_per_query": float(np.mean([len(r["demos_used"]) for r in records])),
    }  # fmt: skip


def write_curve(path: Path, curve: list[dict]) -> None:
    """calibration.csv: the dev accuracy-versus-cost curve (header only when not calibrated)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)


def write_outcome_plots(work: Path, records: list[dict]) -> None:
    """agreement.csv (the student's accuracy at each agreement level of its votes, test) and
    samples_used.csv (how many queries used each number of student samples)."""
    by_agreement: dict[float, list[float]] = {}
    used: dict[int, int] = {}
    for r in records:
        if r["agreement"] is not None and r["_s"] is not None:
            by_agreement.setdefault(round(float(r["agreement"]), 4), []).append(float(r["_s"] >= 1.0))
        used[int(r["samples_used"])] = used.get(int(r["samples_used"]), 0) + 1
    with open(work / "agreement.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["agreement", "student_accuracy", "queries"])
        writer.writerows([a, sum(v) / len(v), len(v)] for a, v in sorted(by_agreement.items()))
    with open(work / "samples_used.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["samples_used", "queries"])
        writer.writerows(sorted(used.items()))
