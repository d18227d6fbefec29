"""`distil generate-teacher-data` for language-model teachers.

For each prompt the teacher samples ``samples`` completions (batched, with the KV cache)
and each row stores the completion, its extracted answer and score
(``stages.lm.scoring.scorer``), the sequence log-probability, and per generated token the
teacher's top-k token ids and log-probs (of the untempered distribution, which is what a
student distils). Prompts are written in parts of ``shard_prompts``; each part samples
from its own seed, so a killed run resumes after its last complete part and produces
exactly what an uninterrupted run would.
Several teachers (``--teacher`` repeated, for ``distill --method mst``) each sample every
prompt, teacher after teacher (one in memory at a time); rows carry the ``teacher`` index
into the manifest's ``teachers`` list, and with ``top_k > 0`` all must share one tokenizer.
With ``decode: scmoe`` an MoE teacher picks its tokens by self-contrast (``stages.lm.moe.scmoe``;
greedy at temperature 0, else sampled from softmax(scores / temperature)) while the stored
top-k log-probs and ``seq_logprob`` stay those of its normal routing.
An MoE teacher also stores its routing per generated token (``routing: auto``, the
default; ``on`` requires an MoE teacher, ``off`` skips it): ``expert_ids`` and
``expert_weights`` of every MoE layer (``stages.lm.moe.routing``), shape in the manifest's
``routing``. SCMoE's weak passes are not recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import LM_TEACHER_DATA, Kind, Output, TableWriter, fingerprint, write_manifest
from stages.config import DataConfig, GenerateTeacherDataConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.lm.generation import sample
from stages.lm.models import is_moe, load_lm
from stages.lm.moe.routing import routing_shape
from stages.lm.moe.scmoe import check_decode, decoding
from stages.lm.scoring import scorer
from stages.lm.teachers.vocabulary import describe_teachers
from stages.progress import progress_bar
from stages.tasks import prompts_in_splits, source_identity
from stages.tasks.reasoning import extract_answer


def run(cfg: GenerateTeacherDataConfig, teacher: Path | list[Path], data, out: Path, *, data_cfg: DataConfig, device: str = "auto",
        progress: bool = True) -> Path:  # fmt: skip
    if cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.shard_prompts < 1 or cfg.top_k < 0:
        raise DistilError("samples, max_new_tokens and shard_prompts must be positive and top_k >= 0")
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise DistilError("several samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    check_decode(cfg.decode, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_weak_rank)
    dev_ = resolve_device(device)
    teachers = [Path(t) for t in teacher] if isinstance(teacher, (list, tuple)) else [Path(teacher)]
    teacher, entries = teachers[0], describe_teachers(teachers, cfg.top_k)  # several: one tokenizer when top_k > 0
    model, tokenizer = load_lm(teacher, dev_)
    decode = decoding(cfg, model, teacher)  # scmoe: rescored steps; the stored top-k stay the teacher's own
    routed = _routing_plan(cfg.routing, model, teacher)  # the recorded routing's shape; None = not recorded
    prompts, task = prompts_in_splits(data, data_cfg, cfg.splits)
    params = {"generate_teacher_data": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"teacher": entries[0]["sha256"], "data": source_identity(data) if Path(data).exists() else f"task:{data}"}
    if len(teachers) > 1:
        inputs["teachers"] = [e["sha256"] for e in entries]
    output = Output(out, fingerprint("generate_teacher_data", params, inputs))
    score = scorer(task)
    with output as work:
        writer = TableWriter(work, LM_TEACHER_DATA)
        start = writer.done_rows // cfg.samples
        tokens, t0 = 0, time.perf_counter()
        with progress_bar(progress) as bar:
            job = bar.add_task("teacher samples", total=len(prompts) * len(teachers), completed=start, info="prompts")
            # several teachers: teacher-major (all parts of teacher 0, then 1, ...), one in memory at a time
            parts = [
                (t, part, lo) for t in range(len(teachers)) for part, lo in enumerate(range(0, len(prompts), cfg.shard_prompts))
            ]
            current = 0
            for t, part, lo in parts:
                if t * len(prompts) + lo < start:
                    continue
                if t != current:
                    model = decode = None  # release the previous teacher before loading the next
                    model, tokenizer = load_lm(teachers[t], dev_)
                    decode, current = decoding(cfg, model, teachers[t]), t
                chunk = prompts[lo : lo + cfg.shard_prompts]
                torch.manual_seed(cfg.seed * 1_000_003 + part + (t << 32))  # per-part seed: resumed parts sample the same
                record = routed is not None and _routes_as(routed, cfg.routing, model, teachers[t])
                rows = sample(model, tokenizer, [r["prompt"] for r in chunk], samples=cfg.samples, temperature=cfg.temperature,
                              top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, device=dev_,
                              decode=decode, routing=record)  # fmt: skip
                records = _records(chunk, rows, score, teacher=t, teachers=len(teachers), samples=cfg.samples)
                tokens += sum(len(r["token_ids"]) for r in records)
                writer.write(pa.Table.from_pylist(records, schema=LM_TEACHER_DATA))
                bar.update(job, completed=t * len(prompts) + min(lo + cfg.shard_prompts, len(prompts)))
        seconds = time.perf_counter() - t0
        _write_manifest(work, cfg, data, params, inputs, entries, routed, teacher=teacher, rows=writer.done_rows, tokens=tokens,
                        seconds=seconds)  # fmt: skip
        return output.commit()


def _records(chunk: list[dict], rows: list[dict], score, *, teacher: int, teachers: int, samples: int) -> list[dict]:
    """The teacher-data rows of one part: per sample its prompt, parsed answer and score and
    the sample's tokens; ids are unique over prompts, teachers and samples."""
    records = []
    for j, gen in enumerate(rows):
        p = chunk[j // samples]
        answer, parse = extract_answer(gen["completion"])
        records.append({
            "id": (p["id"] * teachers + teacher) * samples + j % samples, "prompt_id": p["id"],
            "sample": j % samples, "teacher": teacher,
            "split": p["split"], "task": p["task"], "item": p["item"], "prompt": p["prompt"], "gold": p["answer"],
            "answer": answer, "parse": parse, "score": score(p, answer), "expert_ids": [], "expert_weights": [], **gen,
        })  # fmt: skip
    return records


def _write_manifest(work: Path, cfg: GenerateTeacherDataConfig, data, params: dict, inputs: dict, entries: list[dict],
                    routed: dict | None, *, teacher: Path, rows: int, tokens: int, seconds: float) -> None:  # fmt: skip
    """The manifest: the first teacher as ``model``, every teacher, and what generation cost
    (tokens over all parts, resumed ones included; speed of this run's parts)."""
    size = sum(p.stat().st_size for p in work.glob("part-*.parquet"))
    all_tokens = sum(
        len(ids)
        for part in work.glob("part-*.parquet")
        for ids in pq.read_table(part, columns=["token_ids"]).column(0).to_pylist()
    )
    write_manifest(
        work, kind=Kind.LM_TEACHER_DATA, params=params, inputs=inputs, rows=rows,
        model={"path": str(teacher), "sha256": inputs["teacher"], "vocab_size": entries[0]["vocab_size"]},
        extra={"task": {"name": str(data)}, "teachers": entries, "top_k": cfg.top_k, "decode": cfg.decode, "tokens_generated": all_tokens,
               "tokens_per_second": tokens / max(seconds, 1e-9), "bytes_per_token": size / max(all_tokens, 1),
               **({"routing": routed} if routed is not None else {})},
    )  # fmt: skip


def _routing_plan(mode: str, model, path: Path) -> dict | None:
    """Whether the teacher's routing is recorded (``routing``: auto = when the first teacher
    is MoE, on = it must be, off): its ``{layers, experts, experts_per_token}``, else None."""
    if mode not in ("auto", "on", "off"):
        raise DistilError(f"routing must be auto, on or off, got '{mode}'")
    if mode == "off" or (mode == "auto" and not is_moe(model)):
        return None
    if not is_moe(model):
        raise DistilError(
            f"router data requested from a model without a router: {path} is dense; "
            "use an MoE teacher (lm.family: mixtral, qwen2_moe or olmoe) or set routing=auto/off"
        )
    shape = routing_shape(model)
    if shape["experts"] > 256:
        raise DistilError(
            f"{path} has {shape['experts']} experts per layer; expert ids are stored as uint8 (<= 256): set routing=off"
        )
    return shape


def _routes_as(shape: dict, mode: str, model, path: Path) -> bool:
    """Several teachers: one recorded shape for all. A dense one stores no routing (with
    ``routing: on`` it is an error); an MoE one routing differently is an error."""
    if not is_moe(model):
        if mode == "on":
            raise DistilError(
                f"router data requested from a model without a router: teacher {path} is dense; set routing=auto or off"
            )
        return False
    if routing_shape(model) != shape:
        raise DistilError(
            f"teacher {path} routes over {routing_shape(model)}, the first teacher over {shape}; "
            "teacher data holds one routing shape: set routing=off or generate per teacher"
        )
    return True
