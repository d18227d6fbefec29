"""Built-in data and user tables, all turned into the canonical examples table
(``artifacts.EXAMPLES``: id, split, label, features) plus task metadata.

``load_examples(source, data_cfg)`` accepts a built-in name (``digits``), a distil table
(teacher data or a selection: already split, metadata in its manifest), or a user
Parquet / CSV table whose columns ``DataConfig`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.artifacts import EXAMPLES, MANIFEST, Kind, read_table
from stages.config import DataConfig
from stages.errors import DistilError
from stages.tasks.digits import load_digits
from stages.tasks.domains import domain_of
from stages.tasks.splits import long_tail_keep
from stages.tasks.tabular import load_user_table
from stages.tasks.toy2d import TOY2D

BUILTIN = {"digits": load_digits}
"""Built-in classifier tasks, by the name ``--data`` takes."""
IMAGES = ("digits-images",)
GENERATOR_DATA = (*TOY2D, *IMAGES)
"""Built-in generator datasets (``stages.diffusion.data`` loads them), by the name ``--data`` takes."""


@dataclass
class Examples:
    table: pa.Table
    """Canonical columns first; distil tables keep their extra columns (logits, weight, ...)."""
    num_classes: int
    input_shape: list[int]
    name: str
    class_names: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    """The domain of each position of ``id // DOMAIN_STRIDE`` (``stages.tasks.domains``); [] = one plain domain."""

    def meta(self) -> dict[str, Any]:
        task = {"name": self.name, "num_classes": self.num_classes, "input_shape": self.input_shape, "class_names": self.class_names}
        return {"task": {**task, "domains": self.domains} if self.domains else task}

    def split(self, name: str) -> pa.Table:
        mask = pc.equal(self.table.column("split"), name)
        return self.table.filter(mask)


def load_examples(source: str | Path, data: DataConfig) -> Examples:
    name = str(source)
    if data.domains and name != "digits":
        raise DistilError(f"data.domains transforms the built-in digits, not '{source}'; drop data.domains or use --data digits")
    if name in BUILTIN:
        table, meta = BUILTIN[name](data)
    else:
        path = Path(source)
        if not path.exists():
            raise DistilError(
                f"data '{source}' is neither a built-in task ({', '.join(BUILTIN)}) nor an existing file; check the path"
            )
        if path.is_dir() and (path / MANIFEST).exists():
            table, manifest = read_table(path, EXAMPLES, "table")
            if "task" not in manifest:
                raise DistilError(f"{path}/{MANIFEST} has no task metadata; regenerate the table with distil")
            meta = manifest["task"]
        else:
            table, meta = load_user_table(path, data)
    table = _limit(table, data.limit, by_domain=bool(data.domains))
    if data.long_tail > 0:
        table = _long_tail(table, data, meta["num_classes"])
    labels = table.column("label").to_numpy()
    if labels.min() < 0:
        raise DistilError("labels must be non-negative class indices; map them to 0..C-1 or use string labels")
    if labels.max() >= meta["num_classes"]:
        raise DistilError(f"label {labels.max()} is outside the task's {meta['num_classes']} classes; check the label column")
    return Examples(
        table=table, **{k: meta[k] for k in ("num_classes", "input_shape", "name")}, class_names=list(meta.get("class_names", [])),
        domains=list(meta.get("domains", [])),
    )  # fmt: skip


def _long_tail(table: pa.Table, data: DataConfig, num_classes: int) -> pa.Table:
    """Long-tailed train split (dev and test stay as they are)."""
    split = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    train = split == "train"
    keep = np.ones(len(split), dtype=bool)
    ids, labels = table.column("id").to_numpy(), table.column("label").to_numpy()
    keep[train] = long_tail_keep(ids[train], labels[train], data.long_tail, num_classes, data.split_seed)
    return table.filter(pa.array(keep))


def _limit(table: pa.Table, limit: int, by_domain: bool = False) -> pa.Table:
    if limit <= 0:
        return table
    splits = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    if by_domain:  # per split and domain (``data.domains``): every domain keeps rows
        splits = np.char.add(np.char.add(splits, "|"), domain_of(table.column("id").to_numpy()).astype(str))
    if "task" in table.schema.names:  # prompt tables: per task and split (a task mixture's sizes are per task)
        splits = np.char.add(np.char.add(splits, "|"), table.column("task").to_numpy(zero_copy_only=False).astype(str))
    keep = np.zeros(len(splits), dtype=bool)
    for s in np.unique(splits):
        keep[np.flatnonzero(splits == s)[:limit]] = True
    return table.filter(pa.array(keep))


def source_identity(source: str | Path) -> str:
    """What a run depends on: a built-in task's name, or the content hash of a file/table."""
    from stages.artifacts import artifact_hash

    if str(source) in BUILTIN and not Path(source).exists():
        return f"builtin:{source}"
    return artifact_hash(Path(source))


def load_prompts(source: str | Path, data: DataConfig):
    """(PROMPTS table, the ReasoningTask or None for user data)."""
    from stages.tasks.mixture import build_task, task_names
    from stages.tasks.reasoning import load_prompt_table

    if str(source).startswith("hf:"):
        from stages.tasks.reasoning import load_hub_prompts

        return _limit(load_hub_prompts(str(source)[3:], data.prompt_column, data.answer_column), data.limit), None
    path = Path(source)
    if path.is_dir() and (path / MANIFEST).exists():  # a distil prompt table (e.g. from select --by uncertain)
        from stages.tasks.mixture import task_from_manifest
        from stages.tasks.reasoning import PROMPTS

        table, manifest = read_table(path, PROMPTS, "prompt table")
        if manifest.get("kind") != Kind.LM_PROMPTS:
            raise DistilError(
                f"{path} is {manifest.get('kind')}, not a prompt table; pass a task, a prompt file or select's output"
            )
        return _limit(table.select(PROMPTS.names), data.limit), task_from_manifest(manifest)
    if task_names(source):  # one reasoning task, or a mixture (chain_sum+basic_arithmetic)
        task = build_task(
            source, sizes=data.sizes, seed=data.split_seed, task_options=data.task_options, unlabeled=data.unlabeled,
            chat=data.chat, system=data.system,
        )
        table = task.table()
    else:
        task = None
        table = load_prompt_table(Path(source), data.prompt_column, data.answer_column)
    return _limit(table, data.limit), task


def prompts_in_splits(source: str | Path, data: DataConfig, splits: list[str]):
    """(prompt rows of ``splits`` as dicts, the ReasoningTask or None); none is an error."""
    table, task = load_prompts(source, data)
    rows = [r for r in table.to_pylist() if r["split"] in splits]
    if not rows:
        raise DistilError(f"{source} has no prompts in splits {splits}")
    return rows, task
