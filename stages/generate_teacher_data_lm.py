"""`distil generate-teacher-data` for language-model teachers.

For each prompt the teacher samples ``samples`` completions (batched, with the KV cache)
and each row stores the completion, its extracted answer and score, the sequence
log-probability, and per generated token the teacher's top-k token ids and log-probs
(of the untempered distribution, which is what a student distils). Prompts are written in
parts of ``shard_prompts``; each part samples from its own seed, so a killed run resumes
after its last complete part and produces exactly what an uninterrupted run would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import LM_TEACHER_DATA, Output, TableWriter, fingerprint, write_manifest
from stages.config import DataConfig, GenerateTeacherDataConfig, to_dict
from stages.errors import DistilError
from stages.lm_training import sample
from stages.models import resolve_device
from stages.models.lm import lm_identity, load_lm
from stages.progress import progress_bar
from stages.tasks import prompts_in_splits, source_identity
from stages.tasks.reasoning import extract_answer, normalise


def run_lm(cfg: GenerateTeacherDataConfig, teacher: Path, data, out: Path, *, data_cfg: DataConfig, device: str = "auto",
           progress: bool = True) -> Path:  # fmt: skip
    if cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.shard_prompts < 1 or cfg.top_k < 0:
        raise DistilError("samples, max_new_tokens and shard_prompts must be positive and top_k >= 0")
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise DistilError("several samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    dev_ = resolve_device(device)
    model, tokenizer = load_lm(teacher, dev_)
    prompts, task = prompts_in_splits(data, data_cfg, cfg.splits)
    params = {"generate_teacher_data": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"teacher": lm_identity(teacher)["sha256"], "data": source_identity(data) if Path(data).exists() else f"task:{data}"}
    output = Output(out, fingerprint("generate_teacher_data", params, inputs))
    with output as work:
        writer = TableWriter(work, LM_TEACHER_DATA)
        start = writer.done_rows // cfg.samples
        tokens, t0 = 0, time.perf_counter()
        with progress_bar(progress) as bar:
            job = bar.add_task("teacher samples", total=len(prompts), completed=start, info="prompts")
            for part, lo in enumerate(range(0, len(prompts), cfg.shard_prompts)):
                if lo < start:
                    continue
                chunk = prompts[lo : lo + cfg.shard_prompts]
                torch.manual_seed(cfg.seed * 1_000_003 + part)  # per-part seed: resumed parts sample the same
                rows = sample(model, tokenizer, [r["prompt"] for r in chunk], samples=cfg.samples, temperature=cfg.temperature,
                              top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, device=dev_)  # fmt: skip
                records = []
                for j, gen in enumerate(rows):
                    p = chunk[j // cfg.samples]
                    answer, parse = extract_answer(gen["completion"])
                    if task is not None and p["item"] >= 0:
                        score = task.score(answer, p["split"], p["item"])
                    elif p["answer"] is not None:
                        score = float(answer is not None and normalise(answer) == normalise(p["answer"]))
                    else:
                        score = None
                    tokens += len(gen["token_ids"])
                    records.append({
                        "id": p["id"] * cfg.samples + j % cfg.samples, "prompt_id": p["id"], "sample": j % cfg.samples,
                        "split": p["split"], "task": p["task"], "item": p["item"], "prompt": p["prompt"], "gold": p["answer"],
                        "answer": answer, "parse": parse, "score": score, **gen,
                    })  # fmt: skip
                writer.write(pa.Table.from_pylist(records, schema=LM_TEACHER_DATA))
                bar.update(job, completed=min(lo + cfg.shard_prompts, len(prompts)))
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in work.glob("part-*.parquet"))
        all_tokens = sum(
            len(ids)
            for part in work.glob("part-*.parquet")
            for ids in pq.read_table(part, columns=["token_ids"]).column(0).to_pylist()
        )
        write_manifest(
            work, kind="lm_teacher_data", params=params, inputs=inputs, rows=writer.done_rows,
            model={"path": str(teacher), "sha256": inputs["teacher"], "vocab_size": len(tokenizer)},
            extra={"task": {"name": str(data)}, "top_k": cfg.top_k, "tokens_generated": all_tokens,
                   "tokens_per_second": tokens / max(seconds, 1e-9), "bytes_per_token": size / max(all_tokens, 1)},
        )  # fmt: skip
        return output.commit()
