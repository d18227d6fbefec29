"""``rule_arithmetic``: a procedural task whose rule is visible only through examples, so
in-context demonstrations carry knowledge a student lacks (issue 5, METHODS.md section 6).

Family f of ``families`` is a made-up operator with a nonsense name (``vok``) and one of
``RULES`` (``a - b``); both are fixed by f alone, never by the split seed. A question
applies a family to two one-digit operands, ``vok(7, 3)``, and the answer is the worked
line ``7 - 3 = 4``. A model that has not seen ``vok`` cannot know its rule, but one
demonstration of ``vok`` shows it. ``family_range: [lo, hi]`` draws items from families
lo..hi-1 only: a teacher learns every family, a student's training data can leave some
out, and test queries over all families then ask the student for rules it never trained
on. Rules cycle through ``RULES`` by family, so every range of at least ``len(RULES)``
families holds every rule.

Registered with reasoning-gym's dataset factory, so splits, scoring, mixtures and
``data.task_options`` work as for its own tasks. The scorer reads the number after the
last ``=`` (a bare number is accepted as well) and compares it with the rule's value.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from reasoning_gym.dataset import ProceduralDataset
from reasoning_gym.factory import DATASETS, register_dataset

NAME = "rule_arithmetic"
RULES = ("{a} + {b}", "{a} - {b}", "{a} * {b}")
"""One operation on the two one-digit operands, written in order: arithmetic a small model
learns (300 facts). Which operation is the knowledge only examples show, and one example
shows it without ambiguity (a rule that swapped the operands would need several)."""
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def family_names(n: int) -> list[str]:
    """``n`` distinct consonant-vowel-consonant names, the same for every caller."""
    names = [c + v + d for c in _CONSONANTS for v in _VOWELS for d in _CONSONANTS]
    random.Random(1234).shuffle(names)
    return names[:n]


def rule_of(family: int) -> str:
    return RULES[family % len(RULES)]


def _value(template: str, a: int, b: int) -> int:
    expression = template.format(a=a, b=b)
    return int(eval(expression, {"__builtins__": {}}))  # noqa: S307 - our own templates over two ints


@dataclass
class RuleArithmeticConfig:
    families: int = 32
    family_range: Optional[list[int]] = field(default=None)
    """[lo, hi]: draw items from families lo..hi-1 only (default: all)."""
    seed: Optional[int] = None
    size: int = 500

    def validate(self) -> None:
        assert self.size > 0, "size must be positive"
        names = len(_CONSONANTS) * len(_VOWELS) * len(_CONSONANTS)
        assert 1 <= self.families <= names, f"families must be in 1..{names}"
        lo, hi = self.span()
        assert 0 <= lo < hi <= self.families, f"family_range must be [lo, hi] with 0 <= lo < hi <= families ({self.families})"

    def span(self) -> tuple[int, int]:
        if self.family_range is None:
            return 0, self.families
        lo, hi = self.family_range
        return int(lo), int(hi)


class RuleArithmeticDataset(ProceduralDataset):
    """Item i of seed s: a family in the configured range and two digits from Random(s + i)."""

    def __init__(self, config: RuleArithmeticConfig):
        super().__init__(config=config, seed=config.seed, size=config.size)
        self.names = family_names(config.families)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rng = random.Random(self.seed + idx)
        lo, hi = self.config.span()
        family = rng.randrange(lo, hi)
        a, b = rng.randrange(10), rng.randrange(10)
        template = rule_of(family)
        value = _value(template, a, b)
        return {
            "question": f"{self.names[family]}({a}, {b})",
            "answer": f"{template.format(a=a, b=b)} = {value}",
            "metadata": {"source_dataset": NAME, "source_index": idx, "family": family, "rule": template, "value": value},
        }

    def score_answer(self, answer: Optional[str], entry: dict[str, Any]) -> float:
        if answer is None:
            return 0.0
        found = re.fullmatch(r"\s*(?:.*=)?\s*(-?\d+)\s*\.?\s*", answer)
        return float(found is not None and int(found.group(1)) == entry["metadata"]["value"])


if NAME not in DATASETS:
    register_dataset(NAME, RuleArithmeticDataset, RuleArithmeticConfig)
