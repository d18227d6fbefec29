"""`distil evaluate` for language models.

Greedy completions on the split's prompts give ``accuracy`` (the task's own scorer;
normalised exact match for user prompt tables), the share of unparsable answers,
parameters, prompts/s and tokens/s. With ``samples`` > 1 it also samples n completions
per prompt: ``maj@n`` (the majority answer is right), ``pass@n`` (any answer is right) and
``vote_ece``, the calibration of the majority's vote share as a confidence (15 bins).
On LM teacher data, ``agreement_with_teacher`` compares the greedy answer with the
teacher's majority answer for the same prompt.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stages.lm_training import sample
from stages.metrics import ece
from stages.models.lm import load_lm
from stages.tasks.reasoning import extract_answer, normalise


def _scorer(task):
    def score(row: dict, answer: str | None) -> float | None:
        if task is not None and row.get("item", -1) >= 0:
            return task.score(answer, row["split"], row["item"])
        if row.get("answer") is None:
            return None
        return float(answer is not None and normalise(answer) == normalise(row["answer"]))

    return score


def lm_metrics(path: Path, rows: list[dict], task, cfg, device, teacher_answers: dict[int, str] | None = None) -> dict[str, Any]:
    model, tokenizer = load_lm(path, device)
    score = _scorer(task)
    prompts = [r["prompt"] for r in rows]
    t0 = time.perf_counter()
    greedy = []
    for i in range(0, len(prompts), min(cfg.batch_size, 64)):
        greedy += sample(model, tokenizer, prompts[i : i + 64], samples=1, temperature=0.0, top_p=1.0,
                         max_new_tokens=cfg.max_new_tokens, top_k=0, device=device)  # fmt: skip
    seconds = time.perf_counter() - t0
    answers = [extract_answer(g["completion"])[0] for g in greedy]
    scores = [s for s in (score(r, a) for r, a in zip(rows, answers, strict=True)) if s is not None]
    tokens = sum(len(g["token_ids"]) for g in greedy)
    metrics: dict[str, Any] = {
        "accuracy": float(np.mean(scores)) if scores else float("nan"),
        "unparsed_share": sum(a is None for a in answers) / len(rows),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(rows),
        "rows_per_second": len(rows) / max(seconds, 1e-9),
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "ms_per_1k_rows": 1e6 * seconds / len(rows),
    }
    if teacher_answers is not None:
        pairs = [(a, teacher_answers.get(r["id"])) for r, a in zip(rows, answers, strict=True)]
        metrics["agreement_with_teacher"] = float(
            np.mean([a is not None and t is not None and normalise(a) == normalise(t) for a, t in pairs])
        )
    if cfg.samples > 1:
        metrics.update(_sampled(model, tokenizer, rows, cfg, device, score))
    return metrics


def _sampled(model, tokenizer, rows, cfg, device, score) -> dict[str, float]:
    n = cfg.samples
    maj, any_right, share, maj_right = [], [], [], []
    per_batch = max(1, 64 // n)
    for i in range(0, len(rows), per_batch):
        chunk = rows[i : i + per_batch]
        gens = sample(model, tokenizer, [r["prompt"] for r in chunk], samples=n, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, top_k=0, device=device)  # fmt: skip
        for j, r in enumerate(chunk):
            answers = [extract_answer(g["completion"])[0] for g in gens[j * n : (j + 1) * n]]
            results = [score(r, a) for a in answers]
            if results[0] is None:
                continue
            votes = Counter(normalise(a) for a in answers if a is not None)
            top = votes.most_common(1)[0] if votes else (None, 0)
            top_answer = next((a for a in answers if a is not None and normalise(a) == top[0]), None)
            right = score(r, top_answer) >= 1.0 if top_answer is not None else False
            maj.append(right)
            any_right.append(any(s >= 1.0 for s in results))
            share.append(top[1] / n)
            maj_right.append(right)
    if not maj:
        return {}
    conf = np.asarray(share)
    probs = np.stack([conf, 1 - conf], axis=1)  # the majority's vote share as its confidence
    labels = np.where(np.asarray(maj_right), 0, 1)
    return {f"maj@{n}": float(np.mean(maj)), f"pass@{n}": float(np.mean(any_right)), "vote_ece": ece(probs, labels, 15)}
