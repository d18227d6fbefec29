"""Mixtures of reasoning-gym tasks: ``--data chain_sum+basic_arithmetic`` is one prompt
table over several tasks (for specialised teachers and a student that learns them all).

Each task of a mixture is built exactly as it would be alone (its own train/dev/test
splits, ``data.sizes``, ``data.unlabeled`` and ``data.split_seed``), then the tables are
stacked in the order named:

- ``task`` holds each row's task name; ``id`` counts on across the tasks, so ids are unique;
- ``item`` is ``ITEM_STRIDE * (position of the task in the mixture) + item in that task's
  generator``: the first task keeps its single-task items, and ``item // ITEM_STRIDE``
  says whose scorer rescores an answer (``TaskMixture.score``), so every stage that calls
  ``task.score(answer, split, item)`` works on mixtures unchanged;
- ``data.limit`` keeps the first ``limit`` rows per task and split (as sizes are per task).

``data.task_options`` of a mixture is keyed by task name
(``{chain_sum: {max_terms: 2}, basic_arithmetic: {max_digits: 1}}``); a flat mapping still
means the options of a single task, and is refused for a mixture. A keyed mapping also
works for one task (it takes its own entry), so one params file serves specialists trained
on one task each and a generalist trained on their mixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.errors import DistilError
from stages.tasks.reasoning import PROMPTS, TASKS, ReasoningTask

ITEM_STRIDE = 1_000_000_000
"""``item`` of a mixture row = ITEM_STRIDE * task position + item in the task's generator."""


def task_names(source: Any) -> tuple[str, ...] | None:
    """The reasoning-gym tasks ``source`` names: one of ``TASKS``, or several joined with
    '+' (a mixture). None for anything else (a path, a classifier task, a hub dataset)."""
    name = str(source)
    if name in TASKS:
        return (name,)
    if "+" not in name or name.startswith("hf:") or Path(name).exists():
        return None
    parts = tuple(p.strip() for p in name.split("+"))
    return parts if any(p in TASKS for p in parts) else None


def options_per_task(names: Sequence[str], options: dict | None) -> dict[str, dict]:
    """Generator options for each task of ``names`` from ``data.task_options``: keyed by
    task name (``{chain_sum: {...}}``), or flat (``{max_terms: 2}``) for a single task."""
    options = dict(options or {})
    keyed = bool(options) and all(k in TASKS and isinstance(v, dict) for k, v in options.items())
    if keyed:
        return {n: dict(options.get(n) or {}) for n in names}
    if len(names) == 1:
        return {names[0]: options}
    if options:
        example = ", ".join(f"{n}: {{...}}" for n in names)
        raise DistilError(
            f"data.task_options {options} is flat, but '{'+'.join(names)}' mixes {len(names)} tasks; "
            f"key the options by task: {{{example}}}"
        )
    return {n: {} for n in names}


@dataclass(frozen=True)
class TaskMixture:
    """Several reasoning tasks as one: ``table()`` stacks theirs, ``score`` dispatches."""

    tasks: tuple[ReasoningTask, ...]

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)

    def table(self) -> pa.Table:
        rows: list[dict] = []
        for position, task in enumerate(self.tasks):
            for r in task.table().to_pylist():
                rows.append({**r, "id": len(rows), "item": ITEM_STRIDE * position + r["item"]})
        return pa.Table.from_pylist(rows, schema=PROMPTS)

    def task_of(self, item: int) -> tuple[ReasoningTask, int]:
        """(the task an item belongs to, its item in that task's generator)."""
        position, inner = divmod(int(item), ITEM_STRIDE)
        if not 0 <= position < len(self.tasks):
            raise DistilError(f"item {item} belongs to no task of the mixture '{self.name}'; regenerate the data")
        return self.tasks[position], inner

    def score(self, answer: str | None, split: str, item: int) -> float:
        task, inner = self.task_of(item)
        return task.score(answer, split, inner)


def build_task(source: Any, *, sizes: Sequence[int], seed: int, task_options: dict | None, unlabeled: int, chat: bool = False,
               system: str = ""):  # fmt: skip
    """The ``ReasoningTask`` (one name) or ``TaskMixture`` (names joined by '+') ``source`` names."""
    names = task_names(source)
    if not names:
        raise DistilError(f"'{source}' names no reasoning task; choose from {', '.join(TASKS)} (join several with +)")
    if len(sizes) != 3 or min(sizes) < 1:
        raise DistilError(f"data.sizes must be three positive split sizes (train, dev, test), got {list(sizes)}")
    if unlabeled < 0:
        raise DistilError(f"data.unlabeled must be 0 or more extra train prompts, got {unlabeled}")
    if "" in names:
        raise DistilError(f"'{source}' has an empty task name; join task names with a single +, e.g. chain_sum+basic_arithmetic")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DistilError(f"'{source}' names {', '.join(twice)} more than once; list each task of a mixture once")
    options = options_per_task(names, task_options)
    if system and not chat:
        raise DistilError("data.system is the system turn of chat prompts: set data.chat=true too, or drop data.system")
    tasks = tuple(
        ReasoningTask(n, tuple(sizes), seed, tuple(sorted(options[n].items())), unlabeled, chat, system) for n in names
    )
    return tasks[0] if len(tasks) == 1 else TaskMixture(tasks)


def task_from_manifest(manifest: dict):
    """The reasoning task (or ``TaskMixture``) an LM artifact was made from (None for user prompt tables)."""
    data = manifest.get("params", {}).get("data", {})
    name = manifest.get("task", {}).get("name", "")
    if not task_names(name):
        return None
    return build_task(name, sizes=tuple(data.get("sizes", (2000, 200, 200))), seed=data.get("split_seed", 0),
                      task_options=data.get("task_options"), unlabeled=int(data.get("unlabeled", 0)),
                      chat=bool(data.get("chat", False)), system=str(data.get("system", "")))  # fmt: skip
