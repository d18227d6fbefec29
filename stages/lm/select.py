"""`distil select` for language models: filter LM teacher samples (majority, correct,
length, dedup, chained with ``+``), or pick the prompts a student is least consistent on
(``--by uncertain``) for the teacher to answer.

Selection never rewrites teacher data: it streams the input one part at a time (parts
hold whole prompts) and writes a new table with the same columns plus ``weight`` and
``reason``. Only rows of ``cfg.splits`` are filtered; the others pass through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import (
    LM_SELECTION,
    LM_TEACHER_DATA,
    Kind,
    Output,
    TableWriter,
    artifact_hash,
    fingerprint,
    inspect_table,
    read_manifest,
    with_optional,
    write_manifest,
)
from stages.config import DataConfig, SelectConfig, to_dict
from stages.errors import DistilError
from stages.lm.selectors import LM_SELECTORS, chained
from stages.lm.topk_codec import TopKFormat, TopKWriter
from stages.progress import progress_bar
from stages.selection import Tally


def run(cfg: SelectConfig, data, out: Path, *, student: Path | None = None, data_cfg: DataConfig | None = None,
        device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    if cfg.by == "uncertain":
        return _run_uncertain(
            cfg, data, out, student=student, data_cfg=data_cfg or DataConfig(), device=device, progress=progress
        )
    if student is not None:
        raise DistilError(f"--student is used by --by uncertain only, not '{cfg.by}'")
    return _run_samples(cfg, Path(data), out, progress=progress)


def _run_samples(cfg: SelectConfig, data: Path, out: Path, *, progress: bool) -> Path:
    """LM teacher samples, one part at a time (parts hold whole prompts)."""
    names = cfg.by.split("+")
    if not all(n in LM_SELECTORS for n in names):
        raise DistilError(
            f"unknown selection '{cfg.by}' for LM teacher data; choose one of {', '.join(LM_SELECTORS)} (or chain them: majority+dedup)"
        )
    files, _, total, manifest = inspect_table(data, LM_TEACHER_DATA, "LM teacher data")
    topk = TopKFormat.of(manifest)  # a format this distil cannot read is refused before anything is written
    params = {"select": to_dict(cfg)}
    inputs = {"data": artifact_hash(data)}
    output = Output(out, fingerprint("select", params, inputs))
    with output as work:
        for stale in work.glob("part-*.parquet"):
            stale.unlink()
        writer = TopKWriter(work, LM_SELECTION)  # the columns pass through as stored (topk_format kept)
        tally = Tally(cfg.splits)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"select {cfg.by}", total=total, info="")
            for f in files:  # parts hold whole prompts: per-prompt strategies see every sample of a prompt
                table = with_optional(pq.read_table(f), LM_TEACHER_DATA).select(LM_TEACHER_DATA.names).cast(LM_TEACHER_DATA)
                writer.write(tally.apply(table, *chained(names, table, cfg)))
                bar.update(task, advance=table.num_rows)
        if not tally.kept_any:
            raise DistilError(f"selection '{cfg.by}' kept no rows of {cfg.splits}; relax it (min_agreement, min_score, lengths)")
        write_manifest(work, kind=Kind.LM_SELECTION, params=params, inputs=inputs, rows=writer.done_rows, model=manifest.get("model", {}),
                       extra={"task": manifest.get("task", {}), "top_k": manifest.get("top_k", 0), "selection": tally.stats(),
                              "teachers": manifest.get("teachers", []),
                              **topk.manifest(manifest.get("topk_max_error", 0.0))})  # fmt: skip
        return output.commit()


def _run_uncertain(
    cfg: SelectConfig, data, out: Path, *, student: Path | None, data_cfg: DataConfig, device: str, progress: bool
) -> Path:
    """Test-time self-improvement's selection (Self-Improving LLM Agents at Test-Time,
    TT-D): the student samples ``uncertain_samples`` answers per prompt; the prompts where
    it agrees with itself least are the ones worth asking the teacher about. Writes a prompt
    table (``kind: lm_prompts``) that ``generate-teacher-data`` takes as ``--data``."""
    from stages.devices import resolve_device
    from stages.lm.generation import sample
    from stages.lm.models import lm_identity, load_lm
    from stages.lm.scoring import majority
    from stages.tasks import prompts_in_splits
    from stages.tasks.reasoning import PROMPTS, extract_answer

    if student is None:
        raise DistilError("--by uncertain measures a student's consistency: pass --student DIR")
    if cfg.uncertain_samples < 2 or not 0 < cfg.uncertain_share <= 1:
        raise DistilError("uncertain_samples must be >= 2 and uncertain_share in (0, 1]")
    dev_ = resolve_device(device)
    model, tokenizer = load_lm(student, dev_)
    rows, _ = prompts_in_splits(data, data_cfg, cfg.splits)
    params = {"select": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": str(data), "student": lm_identity(student)["sha256"]}
    output = Output(out, fingerprint("select", params, inputs))
    with output as work:
        n = cfg.uncertain_samples
        agreement = []
        torch.manual_seed(cfg.seed)
        with progress_bar(progress) as bar:
            job = bar.add_task("student self-consistency", total=len(rows), info="prompts")
            for i in range(0, len(rows), 16):
                chunk = rows[i : i + 16]
                gens = sample(model, tokenizer, [r["prompt"] for r in chunk], samples=n, temperature=1.0, top_p=1.0,
                              max_new_tokens=cfg.max_new_tokens, top_k=0, device=dev_)  # fmt: skip
                for j in range(len(chunk)):
                    answers = [extract_answer(g["completion"])[0] for g in gens[j * n : (j + 1) * n]]
                    agreement.append(majority(answers)[1] / n)
                bar.update(job, advance=len(chunk))
        keep_n = max(1, round(cfg.uncertain_share * len(rows)))
        order = sorted(range(len(rows)), key=lambda i: (agreement[i], i))[:keep_n]
        kept = [rows[i] for i in sorted(order)]
        chosen = pa.Table.from_pylist(kept, schema=PROMPTS)
        chosen = chosen.append_column("weight", pa.array([1 - agreement[i] for i in sorted(order)], pa.float32()))
        chosen = chosen.append_column("reason", pa.array([f"student agreement {agreement[i]:.2f}" for i in sorted(order)]))
        TableWriter(work, chosen.schema).write(chosen)
        manifest = read_manifest(Path(data)) if Path(data).is_dir() else {}
        write_manifest(work, kind=Kind.LM_PROMPTS, params=manifest.get("params", params) | {"select": to_dict(cfg)}, inputs=inputs,
                       rows=chosen.num_rows, model=lm_identity(student),
                       extra={"task": {"name": manifest.get("task", {}).get("name", str(data))},
                              "selection": {"kept": chosen.num_rows, "rows": len(rows),
                                            "mean_agreement_kept": float(np.mean([agreement[i] for i in order]))}})  # fmt: skip
        return output.commit()
