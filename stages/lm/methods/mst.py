"""``distil distill --method mst`` on LM teacher data from several teachers: a mixture of
specialised teachers with a gate that picks, per prompt, the one teacher whose samples the
student learns from.

After MST-Distill ("MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation", 2025, github.com/Gray-OREO/MST-Distill): several specialised teachers and an
instance-level router that decides which of them a student distils from. What differs,
honestly: the paper's router is a small network trained jointly with the student (with
masking modules that reshape each teacher's representation); here the gate is a fixed,
training-free rule computed once from the stored teacher samples before training, picks
one teacher per prompt (no soft top-k mixture, so no load-balancing term), and there are
no masking modules. What it keeps is the per-instance choice of teacher. The student then
minimises the ``kd`` loss of the LM track, ``alpha`` x T^2 KL against the chosen teacher's
stored top-k log-probs + (1 - alpha) x CE on that teacher's sampled completion, on the
chosen teacher's rows only (the sparse divergences of ``stages.losses``). Classifier
``mst`` (``stages.classifier.methods.experts.mst``) does learn its gate.

Gates (``GATES``; ``distill.gate``):

- ``confidence`` (label-free): the teacher whose samples for the prompt agree most (the
  share of its samples that give its most frequent parsed answer), ties broken by the
  higher mean sequence log-prob of its samples, then the lower teacher index. With one
  sample per prompt the agreement is 1 for any parsed answer, so the log-prob decides.
- ``task``: the teacher trained on the prompt's task (the ``task`` column against the
  ``tasks`` each teacher's manifest names, recorded in the teacher data's manifest); of
  several, the most specialised (fewest training tasks), then the lower index. A prompt
  task that no teacher was trained on is an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.errors import DistilError
from stages.lm.scoring import majority

GATE_COLUMNS = ["prompt_id", "split", "task", "teacher", "answer", "seq_logprob"]


def confidence_gate(rows: list[dict], teachers: list[dict]) -> dict[int, int]:
    """prompt id -> the teacher whose samples for it agree most (see the module docstring)."""
    groups: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["prompt_id"], r.get("teacher") or 0)].append(r)
    best: dict[int, tuple] = {}
    for (prompt, teacher), samples in groups.items():
        agreement = majority(s["answer"] for s in samples)[1] / len(samples)
        logprob = sum(s["seq_logprob"] for s in samples) / len(samples)
        key = (agreement, logprob, -teacher)
        if prompt not in best or key > best[prompt]:
            best[prompt] = key
    return {p: -key[2] for p, key in best.items()}


def task_gate(rows: list[dict], teachers: list[dict]) -> dict[int, int]:
    """prompt id -> the teacher trained on the prompt's task (see the module docstring)."""
    owner: dict[str, int] = {}
    for task in sorted({r["task"] for r in rows}):
        trained = [i for i, t in enumerate(teachers) if task in (t.get("tasks") or [])]
        if not trained:
            known = "; ".join(f"{i}: {', '.join(t.get('tasks') or []) or 'unknown'}" for i, t in enumerate(teachers))
            raise DistilError(
                f"gate 'task': no teacher was trained on task '{task}' (teachers' tasks: {known}); "
                "add a teacher for it or use --set gate=confidence"
            )
        owner[task] = min(trained, key=lambda i: (len(teachers[i]["tasks"]), i))
    return {r["prompt_id"]: owner[r["task"]] for r in rows}


GATES: dict[str, Callable[[list[dict], list[dict]], dict[int, int]]] = {"confidence": confidence_gate, "task": task_gate}


def teachers_of(manifest: dict, data) -> list[dict]:
    """The teachers of LM teacher data (manifest entries); fewer than two is an error."""
    teachers = list(manifest.get("teachers") or [])
    if not teachers:  # data written before teachers were listed: one teacher, the manifest's model
        teachers = [dict(manifest.get("model") or {}, tasks=[])]
    if len(teachers) < 2:
        raise DistilError(
            f"mst picks among several teachers, but {data} holds samples of one ({teachers[0].get('path', '?')}); "
            "use --method kd, or generate teacher data with --teacher repeated"
        )
    return teachers


def gate_rows(part_loader, files: list[Path], manifest: dict, cfg, data):
    """(part loader and row counter restricted to each prompt's chosen teacher, summary)."""
    if cfg.gate not in GATES:
        raise DistilError(f"unknown gate '{cfg.gate}' for mst on LM teacher data; choose one of {', '.join(GATES)}")
    if cfg.top_k != 1:
        raise DistilError(f"mst on LM teacher data learns from one teacher per prompt; set top_k=1 (got {cfg.top_k})")
    teachers = teachers_of(manifest, data)
    rows = [r for f in files for r in _gate_table(f).to_pylist() if r["split"] in ("train", "dev")]
    seen = sorted({r["teacher"] or 0 for r in rows})
    if seen and seen[-1] >= len(teachers):
        raise DistilError(f"{data} has rows of teacher {seen[-1]} but its manifest lists {len(teachers)}; regenerate it")
    chosen = GATES[cfg.gate](rows, teachers)

    def loader(f, split):
        load = part_loader(f, split)
        return lambda: [r for r in load() if (r.get("teacher") or 0) == chosen.get(r["prompt_id"])]

    def count(f, split):
        return sum(r["split"] == split and (r["teacher"] or 0) == chosen.get(r["prompt_id"]) for r in _gate_table(f).to_pylist())

    return loader, count, _summary(rows, chosen, teachers, cfg.gate)


def _gate_table(f: Path) -> pa.Table:
    names = pq.read_schema(f).names
    table = pq.read_table(f, columns=[c for c in GATE_COLUMNS if c in names])
    if "teacher" not in names:  # single-teacher files from before the column existed
        table = table.append_column("teacher", pa.nulls(table.num_rows, pa.int32()))
    return table


def _summary(rows: list[dict], chosen: dict[int, int], teachers: list[dict], gate: str) -> dict:
    """How many prompts each teacher won, per split and (train) per task."""
    prompts = {(r["prompt_id"], r["split"], r["task"]) for r in rows}
    wins = {s: [0] * len(teachers) for s in ("train", "dev")}
    by_task: dict[str, list[int]] = {}
    for prompt, split, task in prompts:
        wins[split][chosen[prompt]] += 1
        if split == "train":
            by_task.setdefault(task, [0] * len(teachers))[chosen[prompt]] += 1
    return {
        "gate": gate,
        "teachers": [t.get("path", "") for t in teachers],
        "teacher_wins": wins["train"],
        "teacher_wins_dev": wins["dev"],
        "teacher_wins_by_task": dict(sorted(by_task.items())),
    }
