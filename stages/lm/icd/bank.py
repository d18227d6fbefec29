"""The demonstration bank of in-context distillation (METHODS.md section 6).

A demonstration is a teacher question/answer pair from LM teacher data: one per train
prompt whose teacher answer parsed, the first sample carrying the prompt's majority answer
(the self-consistent one, ``stages.lm.scoring.majority_index``), written as
``"<prompt> <answer>"`` (prompts end in ``Answer:``). ``Bank`` retrieves the k most similar
demonstrations for a query through a ``DemoIndex`` and builds the student's prompt from
them; ``--online`` cascades append the teacher's answers to deferred queries.

In a prompt the demonstrations come most similar *last*, right before the query: the
demonstration nearest the question is the one the model reads last (recency matters most
to small models), and the order is stable for a given bank and query.

This module also reads what a cascade takes from LM teacher data: its train rows (the
bank) and, through its manifest, the dev and test prompts of the task and the task itself
(which ``stages.lm.scoring.scorer`` scores with).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.artifacts import ICD_BANK, LM_TEACHER_DATA, MANIFEST, Kind, TableWriter, inspect_table, write_manifest
from stages.errors import DistilError
from stages.lm.icd.retrieval import DemoIndex
from stages.lm.scoring import majority_index
from stages.tasks.reasoning import ReasoningTask

SEPARATOR = "\n\n"


def read_teacher_data(data: str | Path) -> tuple[list[dict], dict]:
    """The train-split rows and the manifest of LM teacher data, validated."""
    path = Path(data)
    if not (path.is_dir() and (path / MANIFEST).exists()):
        raise DistilError(
            f"LM cascades read LM teacher data; {data} is not a distil table (run `distil generate-teacher-data` first)"
        )
    cols = ["prompt_id", "sample", "split", "prompt", "answer", "score", "token_ids"]
    files, _, _, manifest = inspect_table(path, pa.schema([LM_TEACHER_DATA.field(c) for c in cols]), "LM teacher data")
    if manifest.get("kind") != Kind.LM_TEACHER_DATA:
        raise DistilError(
            f"{data} is {manifest.get('kind')!r}, not LM teacher data; pass the output of `distil generate-teacher-data`"
        )
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files], promote_options="default")
    return train_rows(table), manifest


def train_rows(table: pa.Table) -> list[dict]:
    """The train-split teacher samples, ordered by prompt then sample."""
    train = table.filter(pc.equal(table.column("split"), "train"))
    cols = ["prompt_id", "sample", "split", "prompt", "answer", "score", "token_ids"]
    return sorted(train.select(cols).to_pylist(), key=lambda r: (r["prompt_id"], r["sample"]))


def demonstrations(rows: list[dict], verified: bool) -> list[dict]:
    """One demonstration per train prompt (see the module docstring). With ``verified``
    only those whose answer the task scored correct (score >= 1) stay; unscored ones go."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["prompt_id"]].append(r)
    demos = []
    for pid in sorted(groups):
        first = majority_index(r["answer"] for r in groups[pid])
        best = groups[pid][first] if first is not None else None
        if best is None or (verified and (best["score"] is None or best["score"] < 1.0)):
            continue
        demos.append(demo(pid, "train", "teacher_data", best["prompt"], best["answer"]))
    return demos


def demo(prompt_id: int, split: str, source: str, prompt: str, answer: str) -> dict:
    """A bank row: ``text`` is the prompt followed by the answer."""
    return {"prompt_id": prompt_id, "split": split, "source": source, "prompt": prompt, "answer": answer,
            "text": f"{prompt.rstrip()} {answer.strip()}"}  # fmt: skip


def build_tokens(rows: list[dict], count_prompt: Callable[[list[str]], list[int]]) -> tuple[int, int]:
    """(prompt, completion) teacher tokens spent generating ``rows``: each prompt is read once
    per generate call (its samples share it), each sample's completion counts in full."""
    prompts: dict[int, str] = {}
    completion = 0
    for r in rows:
        prompts.setdefault(r["prompt_id"], r["prompt"])
        completion += len(r["token_ids"])
    return int(sum(count_prompt(list(prompts.values())))), completion


class Bank:
    """Demonstrations and their search index; ``retrieve`` never returns a demonstration
    whose question is the query's own (identical prompt text)."""

    def __init__(self, rows: list[dict], *, kind: str, embedder: str, device: str = "cpu"):
        self.rows: list[dict] = []
        self._by_prompt: dict[str, set[int]] = defaultdict(set)
        self.index = DemoIndex([], kind=kind, embedder=embedder, device=device)
        self.initial = len(rows)
        self.add(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[dict]) -> None:
        """Append demonstrations; they get the next bank ids and are searchable at once."""
        if not rows:
            return
        for r in rows:
            self._by_prompt[r["prompt"].strip()].add(len(self.rows))
            self.rows.append(dict(r, bank_id=len(self.rows)))
        self.index.add([r["text"] for r in rows])

    def retrieve(self, prompts: list[str], k: int) -> list[list[int]]:
        """Bank ids of the ``k`` demonstrations most similar to each prompt, most similar first."""
        exclude = [set(self._by_prompt.get(p.strip(), ())) for p in prompts]
        return self.index.search(prompts, k, exclude)

    def prompt(self, ids: list[int], query: str) -> str:
        """The in-context prompt: demonstrations (most similar last), then the query."""
        return "".join(self.rows[i]["text"] + SEPARATOR for i in reversed(ids)) + query

    def save(self, directory: Path, *, params: dict[str, Any], inputs: dict[str, str]) -> None:
        """``rows/`` (a Parquet table any reader opens) and ``index/`` (DemoIndex.save)."""
        if not self.rows:
            raise DistilError("the demonstration bank is empty; check the teacher data's train split")
        rows = Path(directory) / "rows"
        rows.mkdir(parents=True, exist_ok=True)
        TableWriter(rows, ICD_BANK).write(pa.Table.from_pylist(self.rows, schema=ICD_BANK))
        write_manifest(rows, kind=Kind.ICD_BANK, params=params, inputs=inputs, rows=len(self.rows),
                       extra={"initial_rows": self.initial, "retriever": self.index.kind})  # fmt: skip
        self.index.save(Path(directory) / "index")


def task_queries(manifest: dict) -> tuple[dict[str, list[dict]], ReasoningTask | None]:
    """Dev and test prompts of the task the teacher data was made from, and the task."""
    from stages.config import DataConfig, from_dict
    from stages.tasks import load_prompts
    from stages.tasks.mixture import task_names

    source = str(manifest.get("task", {}).get("name", ""))
    if not task_names(source) and not source.startswith("hf:") and not Path(source).exists():
        raise DistilError(f"the teacher data was made from prompts {source!r}, which are gone; keep them where they were")
    data_cfg = from_dict(DataConfig, manifest.get("params", {}).get("data", {}), "data (teacher data manifest)")
    table, task = load_prompts(source, data_cfg)
    rows = table.to_pylist()
    return {s: [r for r in rows if r["split"] == s] for s in ("dev", "test")}, task


def icd_prompts(rows: list[dict], prompts: list[str], k: int, *, kind: str, embedder: str) -> dict[str, str]:
    """Each prompt with the ``k`` bank demonstrations most like it (never its own question),
    the bank built from the train ``rows`` of teacher data or a selection exactly as a cascade
    builds it: the prompts an ICD-ready student trains on are the prompts it is served."""
    bank = Bank(demonstrations(rows, verified=False), kind=kind, embedder=embedder)
    if len(bank) <= k:
        raise DistilError(f"{k} demonstrations per prompt need a bank of more than {k}; it has {len(bank)}")
    unique = list(dict.fromkeys(prompts))
    return {p: bank.prompt(ids, p) for p, ids in zip(unique, bank.retrieve(unique, k), strict=True)}
