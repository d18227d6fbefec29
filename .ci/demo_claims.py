"""The claims the demo's tables make, checked on the metrics `make demo` just wrote: on the
language-model branch the teacher beats every distilled student and every distilled student
beats the student trained on the gold answers alone (the order README shows). Exit 1 naming
the broken link when the order fails, so CI catches a change that makes distillation hurt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEACHER, GOLD = "lm_teacher", "lm_sft_gold"
DISTILLED = ("lm_kd", "lm_on_policy")


def broken(accuracy: dict[str, float]) -> list[str]:
    """Each link of teacher > distilled > gold that fails, as a sentence."""
    out = []
    for student in DISTILLED:
        if not accuracy[TEACHER] > accuracy[student]:
            out.append(f"{student} ({accuracy[student]:.3f}) is not below the teacher ({accuracy[TEACHER]:.3f})")
        if not accuracy[student] > accuracy[GOLD]:
            out.append(f"{student} ({accuracy[student]:.3f}) does not beat the gold-only student ({accuracy[GOLD]:.3f})")
    return out


def main(path: str = "metrics_lm/metrics.json") -> int:
    metrics = json.loads(Path(path).read_text())
    accuracy = {name: float(metrics[name]["accuracy"]) for name in (TEACHER, GOLD, *DISTILLED)}
    failures = broken(accuracy)
    for line in failures:
        print(f"demo claim failed: {line}", file=sys.stderr)
    if not failures:
        students = ", ".join(f"{n} {accuracy[n]:.3f}" for n in DISTILLED)
        print(f"demo claims hold: {TEACHER} {accuracy[TEACHER]:.3f} > {{{students}}} > {GOLD} {accuracy[GOLD]:.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
