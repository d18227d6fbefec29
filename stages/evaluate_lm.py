"""`distil evaluate` for language models: greedy completions on the split's prompts, the
answer extracted and scored by the task's own scorer (normalised exact match for user
prompt tables), plus parse failures, parameters and throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages.lm_training import generate
from stages.models.lm import load_lm
from stages.tasks.reasoning import extract_answer, normalise


def lm_metrics(path: Path, rows: list[dict], task, cfg, device) -> dict[str, Any]:
    model, tokenizer = load_lm(path, device)
    t0 = time.perf_counter()
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                           batch_size=min(cfg.batch_size, 64), device=device)  # fmt: skip
    seconds = time.perf_counter() - t0
    scores, unparsed = [], 0
    for r, completion in zip(rows, completions, strict=True):
        answer, _ = extract_answer(completion)
        unparsed += answer is None
        if task is not None and r["item"] >= 0:
            scores.append(task.score(answer, r["split"], r["item"]))
        elif r["answer"] is not None:
            scores.append(float(answer is not None and normalise(answer) == normalise(r["answer"])))
    return {
        "accuracy": sum(scores) / len(scores) if scores else float("nan"),
        "unparsed_share": unparsed / len(rows),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(rows),
        "rows_per_second": len(rows) / max(seconds, 1e-9),
        "ms_per_1k_rows": 1e6 * seconds / len(rows),
    }
