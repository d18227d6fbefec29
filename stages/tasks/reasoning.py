"""Procedural reasoning tasks from reasoning-gym (a PyPI package: generators and their own
answer scorers, nothing downloaded), and user prompt tables.

A task owns its prompt format, answer extraction and scoring. Items are fixed by seed:
split s of task t is ``reasoning_gym.create_dataset(t, size=n_s, seed=(seed * 3 + s) * SEED_STRIDE)``,
and train items whose question also appears in dev or test are dropped, so no test
question is ever trained on. reasoning-gym draws item i of seed r from ``Random(r + i)``,
so seeds one apart give the same questions shifted by one item: the stride keeps the
splits' seed ranges apart (chance repeats of a small question space remain, and are
dropped from train as above).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.artifacts import optional_field, read_any_table
from stages.errors import DistilError
from stages.tasks.messages import MESSAGES, final_answer, parse_messages, plain, prompt_turns, to_json

TASKS = (
    "basic_arithmetic", "chain_sum", "number_sorting", "gsm_symbolic", "letter_counting", "spell_backward",
    "word_sequence_reversal", "gcd", "rule_arithmetic",
)  # fmt: skip
"""reasoning-gym's tasks whose answer is one short line, and ``rule_arithmetic`` (ours,
registered with its factory)."""
SPLITS = ("train", "dev", "test")
TRAIN_OPTIONS = "train_options"
"""``data.task_options.train_options``: generator options for the train split only (train on
a narrower distribution than dev and test ask about, e.g. ``rule_arithmetic``'s families)."""
SEED_STRIDE = 10_000_000
"""Generator seeds of consecutive splits lie this far apart (more than any split's size)."""

PROMPTS = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("item", pa.int64()),
        optional_field(MESSAGES, pa.string(), "chat rows: the conversation as JSON [{role, content}]; null = a text prompt"),
    ]
)
"""Prompts for a language model: the gold ``answer`` may be null (unlabelled prompts);
``item`` indexes the task's generator (-1 for user data) so its scorer can be rerun.
A chat row (``stages.tasks.messages``) keeps its whole conversation in ``messages``, its
``prompt`` is the conversation before a final assistant turn in the plain format (for
commands that read text prompts only), and ``answer`` is the answer column's, else the
final assistant message's content."""


def prompt_for(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def extract_answer(completion: str) -> tuple[str | None, str]:
    """The answer is the first non-empty line of the completion, without a trailing period
    or an "Answer:" echo. Returns (answer, reason); answer is None when nothing is there."""
    for line in completion.splitlines():
        line = re.sub(r"^\s*(answer\s*:)?\s*", "", line, flags=re.IGNORECASE).strip().rstrip(".").strip()
        if line:
            return line, "ok"
    return None, "empty completion"


@lru_cache(maxsize=32)
def _dataset(task: str, size: int, seed: int, options: tuple = ()):
    import reasoning_gym

    import stages.tasks.rule_arithmetic  # noqa: F401  registers the task with reasoning-gym

    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **dict(options))
    except (TypeError, ValueError, AssertionError) as exc:
        raise DistilError(
            f"reasoning-gym rejects options {dict(options)} for '{task}' ({exc}); check data.task_options"
        ) from None


@dataclass(frozen=True)
class ReasoningTask:
    name: str
    sizes: tuple[int, int, int] = (2000, 200, 200)
    seed: int = 0
    options: tuple = ()
    """Generator options as sorted (key, value) pairs (hashable, so datasets are cached)."""
    unlabeled: int = 0
    """Train items after the first ``sizes[0]`` whose gold answer is withheld: prompts a
    teacher can label (and the task's verifier can still score) but gold-only training never sees."""
    chat: bool = False
    """Each prompt also as a conversation (``messages``: ``system`` when set, then the question
    as one user turn), so a chat model reads it through its own template."""
    system: str = ""

    def __post_init__(self):
        if self.name not in TASKS:
            raise DistilError(f"unknown reasoning task '{self.name}'; choose one of {', '.join(TASKS)}")

    def _split_dataset(self, split: str):
        s = SPLITS.index(split)
        extra = self.unlabeled if split == "train" else 0
        options = dict(self.options)
        narrower = options.pop(TRAIN_OPTIONS, None) or {}
        if not isinstance(narrower, dict):
            raise DistilError(f"data.task_options.{TRAIN_OPTIONS} must be a mapping of generator options, got {narrower!r}")
        if split == "train":
            options.update(narrower)
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))  # hashable for the cache
        return _dataset(self.name, self.sizes[s] + extra, (self.seed * 3 + s) * SEED_STRIDE, frozen)

    def table(self) -> pa.Table:
        held_out = {str(x["question"]) for split in ("dev", "test") for x in self._split_dataset(split)}
        rows: dict[str, list[Any]] = {k: [] for k in PROMPTS.names}
        for split in SPLITS:
            for i, x in enumerate(self._split_dataset(split)):
                if split == "train" and str(x["question"]) in held_out:
                    continue
                rows["id"].append(len(rows["id"]))
                rows["split"].append(split)
                rows["task"].append(self.name)
                labelled = split != "train" or i < self.sizes[0]
                rows["answer"].append(str(x["answer"]) if labelled else None)
                rows["item"].append(i)
                if self.chat:
                    turns = [{"role": "system", "content": self.system}] if self.system else []
                    turns.append({"role": "user", "content": str(x["question"]).strip()})
                    rows["prompt"].append(plain(turns, add_generation_prompt=True))
                    rows[MESSAGES].append(to_json(turns))
                else:
                    rows["prompt"].append(prompt_for(str(x["question"])))
                    rows[MESSAGES].append(None)
        return pa.table(rows, schema=PROMPTS)

    def score(self, answer: str | None, split: str, item: int) -> float:
        """The package's own scorer (1.0 correct, partial credit where it gives any)."""
        if answer is None:
            return 0.0
        ds = self._split_dataset(split)
        return float(ds.score_answer(answer=answer, entry=ds[item]))


def normalise(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().rstrip(".")).lower()


def load_prompt_table(path: Path, prompt_column: str = "prompt", answer_column: str = "answer") -> pa.Table:
    """A user prompt table (JSONL, Parquet or CSV) as ``PROMPTS``; answers are optional.
    Without a split column every row is a test row. A table holds text prompts
    (``prompt_column``) or conversations (a ``messages`` column, or ``prompt_column:
    messages``; ``stages.tasks.messages``): a JSONL list, a Parquet list<struct<role,
    content>> or JSON string, a CSV JSON string."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        raw = _read_json_lines(path)
    else:
        raw = read_any_table(path)
    chat = _is_chat(raw.schema.names, prompt_column, path)
    if raw.num_rows == 0:
        raise DistilError(f"{path} is empty; pass at least one prompt")
    for name in (answer_column, "split") if chat else (prompt_column, answer_column, "split"):
        kind = raw.schema.field(name).type if name in raw.schema.names else pa.string()
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
                or pa.types.is_floating(kind) or pa.types.is_null(kind) and name != prompt_column):  # fmt: skip
            raise DistilError(f"{path}: column '{name}' has type {kind}; it must hold text, one value per row")
    answers = (
        [None if a is None else str(a) for a in raw.column(answer_column).to_pylist()]
        if answer_column in raw.schema.names
        else [None] * raw.num_rows
    )
    if chat:
        conversations = [parse_messages(v, f"{path} row {i}") for i, v in enumerate(raw.column(MESSAGES).to_pylist())]
        prompts = [plain(prompt_turns(m), add_generation_prompt=True) for m in conversations]
        answers = [final_answer(m) if a is None else a for a, m in zip(answers, conversations, strict=True)]
        messages = [to_json(m) for m in conversations]
    else:
        prompts = ["" if p is None else str(p) for p in raw.column(prompt_column).to_pylist()]
        if any(not p.strip() for p in prompts):
            raise DistilError(f"{path}: {sum(not p.strip() for p in prompts)} prompt(s) are empty; drop them")
        messages = [None] * len(prompts)
    splits = [str(s) for s in raw.column("split").to_pylist()] if "split" in raw.schema.names else ["test"] * len(prompts)
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise DistilError(f"{path}: split column holds {bad}; allowed values are train, dev, test")
    n = len(prompts)
    return pa.table(
        {"id": list(range(n)), "split": splits, "task": [path.stem] * n, "prompt": prompts, "answer": answers, "item": [-1] * n,
         MESSAGES: messages},
        schema=PROMPTS,
    )  # fmt: skip


def _is_chat(names: list[str], prompt_column: str, where) -> bool:
    """Whether a table's prompts are conversations: a ``messages`` column and no prompt column
    (or ``prompt_column`` is ``messages``); both is an error, neither too."""
    if prompt_column != MESSAGES and prompt_column in names:
        if MESSAGES in names:
            raise DistilError(
                f"{where} has both a '{prompt_column}' and a '{MESSAGES}' column; a table holds text prompts or conversations: "
                f"drop one, or set data.prompt_column={MESSAGES} to use the conversations"
            )
        return False
    if MESSAGES in names:
        return True
    raise DistilError(f"{where} has no prompt column '{prompt_column}' nor '{MESSAGES}' (columns: {', '.join(names)})")


def _read_json_lines(path: Path) -> pa.Table:
    """A JSON-lines file as a table, one column per key seen in any row (``messages`` as JSON
    text). Parsed with Python's ``json``, not ``pyarrow.json``: that reader can crash the
    process on malformed bytes."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"line {n} is not a JSON object")
                    if MESSAGES in rows[-1] and not isinstance(rows[-1][MESSAGES], str):  # validated per row later, not
                        rows[-1][MESSAGES] = json.dumps(rows[-1][MESSAGES])  # by arrow (whose type errors name no row)
    except PermissionError:
        raise DistilError(f"permission denied: {path}; check its permissions") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DistilError(f"cannot read {path} as JSON lines ({str(exc)[:120]}); one JSON object per line") from None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        raise DistilError(f"{path}: a key holds values of different types ({str(exc)[:120]}); give each key one type") from None


def load_hub_prompts(name: str, prompt_column: str = "prompt", answer_column: str = "answer") -> pa.Table:
    """Prompts through ``datasets.load_dataset``: a hub name (online users) or a local
    directory of data files. Splits train / validation (or dev) / test map to ours; a
    ``messages`` column holds conversations, as in ``load_prompt_table``."""
    try:
        import datasets
    except ImportError:
        raise DistilError("hf: data needs the datasets package: pip install 'distil[hub]'") from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types for a missing or offline dataset
        raise DistilError(
            f"cannot load dataset '{name}' ({str(exc).splitlines()[0][:140]}); offline, pass a local directory"
        ) from None
    names = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
    rows: list[dict] = []
    for split, ds in loaded.items():
        if split not in names:
            continue
        chat = _is_chat(ds.column_names, prompt_column, f"dataset '{name}' split {split}")
        for i, r in enumerate(ds):
            answer = None if r.get(answer_column) is None else str(r[answer_column])
            row = {"id": len(rows), "split": names[split], "task": Path(name).name, "item": -1}
            if chat:
                m = parse_messages(r[MESSAGES], f"dataset '{name}' split {split} row {i}")
                row.update(prompt=plain(prompt_turns(m), add_generation_prompt=True), messages=to_json(m),
                           answer=final_answer(m) if answer is None else answer)  # fmt: skip
            else:
                row.update(prompt=str(r[prompt_column]), answer=answer)
            rows.append(row)
    if not rows:
        raise DistilError(f"dataset '{name}' has no train, validation or test split")
    return pa.Table.from_pylist(rows, schema=PROMPTS)
