"""`distil generate-teacher-data` for language-model teachers.

The teacher is a ``stages.lm.teachers.Teacher``: a model run in process, a vLLM engine, or
an OpenAI-compatible server (``--teacher http://HOST:PORT/v1``); the table is the same
whatever the backend. A served teacher's samples carry token ids and top-k only when its
tokenizer is checked to be ``teacher.tokenizer``; otherwise they are stored as text (for
``sft``), and the manifest says why.

For each prompt the teacher samples ``samples`` completions (batched, with the KV cache)
and each row stores the completion, its extracted answer and score
(``stages.lm.scoring.scorer``), the sequence log-probability, and per generated token the
teacher's top-k token ids and log-probs (of the untempered distribution, which is what a
student distils; stored compactly, ``topk_format`` 2 of ``stages.lm.topk_codec``). Prompts are written in parts of ``shard_prompts``; each part samples
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
Chat rows (a ``messages`` column, ``stages.tasks.messages``) are prompted with the
conversation before any final assistant turn, rendered with the teacher's own chat template
and the generation prompt (``stages.lm.chat.render``; the plain format without a template);
the row stores that text in ``prompt`` and the conversation as JSON in ``messages``. A served
teacher renders locally with ``teacher.tokenizer`` through ``teacher.api=completions`` (and
is refused without one); through ``teacher.api=chat`` the server applies its own template to
the one user message the Teacher protocol sends, so only single-turn prompts without a
system message go that way, and ``prompt`` keeps the local rendering for reference.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts import LM_TEACHER_DATA, Kind, Output, fingerprint, write_manifest
from stages.config import DataConfig, GenerateTeacherDataConfig, to_dict
from stages.devices import resolve_device
from stages.distributed import barrier, ranks
from stages.errors import DistilError
from stages.lm.chat import render
from stages.lm.models import is_moe, load_lm
from stages.lm.moe.routing import routing_shape
from stages.lm.moe.scmoe import check_decode, decoding
from stages.lm.scoring import scorer
from stages.lm.teachers import Sampling, backend_of, open_teacher, resolve
from stages.lm.teachers.vocabulary import describe_teachers
from stages.lm.topk_codec import FORMAT, TopKFormat, TopKWriter, check_resumable, encode, max_error
from stages.progress import progress_bar
from stages.tasks import prompts_in_splits, source_identity
from stages.tasks.messages import MESSAGES, from_json, plain, prompt_turns, to_json
from stages.tasks.reasoning import extract_answer


def run(cfg: GenerateTeacherDataConfig, teacher: Path | str | list, data, out: Path, *, data_cfg: DataConfig, device: str = "auto",
        progress: bool = True) -> Path:  # fmt: skip
    if cfg.samples < 1 or cfg.max_new_tokens < 1 or cfg.shard_prompts < 1 or cfg.top_k < 0:
        raise DistilError("samples, max_new_tokens and shard_prompts must be positive and top_k >= 0")
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise DistilError("several samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    check_decode(cfg.decode, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_weak_rank)
    dev_ = resolve_device(device)
    specs = [str(t) for t in teacher] if isinstance(teacher, (list, tuple)) else [str(teacher)]
    local = _check_backends(cfg, specs)
    teachers = [Path(t) for t in specs] if local else specs
    prompts, task = prompts_in_splits(data, data_cfg, cfg.splits)  # bad data is refused before a server is asked
    chat_api = _check_chat(prompts, cfg, specs, local)
    current = _open(cfg, teachers[0], dev_, local)
    entries = describe_teachers(teachers, cfg.top_k) if local else [_remote_entry(current)]
    agent = cfg.agent.tool != "none"
    routed = _routing_plan(cfg.routing, current.model, teachers[0]) if local and not agent else None
    text_only = AGENT_TEXT if agent else None if local else _text_only(current, cfg.top_k)
    params = {"generate_teacher_data": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"teacher": entries[0]["sha256"], "data": source_identity(data) if Path(data).exists() else f"task:{data}"}
    if len(teachers) > 1:
        inputs["teachers"] = [e["sha256"] for e in entries]
    output = Output(out, fingerprint("generate_teacher_data", params, inputs))
    score = scorer(task)
    rank, world = ranks()
    with _opened(output, rank, world) as work:
        mine = work if world == 1 else work / f"rank-{rank:03d}"
        mine.mkdir(exist_ok=True)
        writer = TopKWriter(mine, LM_TEACHER_DATA)
        check_resumable(writer.parts)
        # several teachers: teacher-major (all parts of teacher 0, then 1, ...), one in memory at a time; with several
        # processes part i is process i % world's
        parts = [(t, part, lo) for t in range(len(teachers)) for part, lo in enumerate(range(0, len(prompts), cfg.shard_prompts))]
        todo = [p for i, p in enumerate(parts) if i % world == rank][len(writer.parts) :]  # a resumed run skips its complete parts
        t0 = time.perf_counter()
        with progress_bar(progress and rank == 0) as bar:
            job = bar.add_task("teacher samples", total=len(parts), completed=len(parts) - len(todo) * world, info="parts")
            step = {"cfg": cfg, "teachers": teachers, "prompts": prompts, "score": score, "routed": routed, "text_only": text_only,
                    "local": local, "chat_api": chat_api, "device": dev_, "k": _stored_k(mine) if text_only is None else 0}  # fmt: skip
            tokens = _generate(step, current, todo, writer, lambda: bar.update(job, advance=world))
        seconds = time.perf_counter() - t0
        barrier()
        if rank != 0:
            return output.final
        _merge_ranks(work, world)
        _write_manifest(work, cfg, data, params, inputs, entries, routed, teacher=teachers[0], rows=_rows(work), tokens=tokens,
                        seconds=seconds, top_k=_stored_k(work) if text_only is None else 0, text_only=text_only)  # fmt: skip
        return output.commit()


AGENT_TEXT = "agent trajectories: the code tool wrote their observations, so only their text is stored (for sft)"


def _generate(step: dict, current, todo: list[tuple], writer: TopKWriter, advance) -> int:
    """Sample the parts ``todo`` ((teacher, part, first prompt) each) and write each as one
    Parquet part; returns the tokens generated."""
    cfg, teachers, local, tokens, at = step["cfg"], step["teachers"], step["local"], 0, 0
    for t, part, lo in todo:
        if t != at:
            current.close()  # release the previous teacher before loading the next
            current, at = _open(cfg, teachers[t], step["device"], local), t
        chunk = step["prompts"][lo : lo + cfg.shard_prompts]
        routed = step["routed"]
        if local:
            current.routing = routed is not None and _routes_as(routed, cfg.routing, current.model, teachers[t])
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            top_k=cfg.top_k if step["text_only"] is None else 0,
                            seed=cfg.seed * 1_000_003 + part + (t << 32))  # per-part seed: resumed parts sample the same
        chunk, sent = _chat_prompts(chunk, current, step["chat_api"])
        done = current.generate(sent, cfg.samples, sampling)
        step["k"] = _uniform_k(done, step["k"], step["text_only"] is not None, teachers[t])
        records, error = _records(chunk, done, step["score"], teacher=t, teachers=len(teachers), samples=cfg.samples, k=step["k"])
        tokens += sum(len(r["token_ids"]) for r in records)
        writer.write(pa.Table.from_pylist(records, schema=LM_TEACHER_DATA), max_error=error)
        advance()
    current.close()
    return tokens


@contextlib.contextmanager
def _opened(output: Output, rank: int, world: int):
    """The work directory: opened by the first process (which clears a stale one), then
    shared; a resumed run must have as many processes as the killed one."""
    if world == 1:
        with output as work:
            if list(work.glob("rank-*")):
                raise DistilError(f"{work} was started by several processes: resume with as many (torchrun / accelerate launch), "
                                  f"or delete {work}")  # fmt: skip
            yield work
        return
    if rank == 0:
        work = output.open()
        seen = work / ".processes"
        before = seen.read_text().strip() if seen.exists() else ("1" if list(work.glob("part-*.parquet")) else str(world))
        if before != str(world):
            barrier()
            raise DistilError(f"{work} was started by {before} process(es), not {world}: resume with as many, or delete {work}")
        seen.write_text(f"{world}\n")
    barrier()
    seen = output.dir / ".processes"
    if rank != 0 and not (seen.exists() and seen.read_text().strip() == str(world)):
        raise DistilError(f"{output.dir} cannot be resumed by {world} processes; see the first process's message")
    yield output.dir


def _merge_ranks(work: Path, world: int) -> None:
    """Each process's parts into one table, in the order one process writes them: process
    r's j-th part is part j * world + r."""
    if world == 1:
        return
    for r in range(world):
        mine = work / f"rank-{r:03d}"
        for j, part in enumerate(sorted(mine.glob("part-*.parquet"))):
            os.replace(part, work / f"part-{j * world + r:05d}.parquet")
        mine.rmdir()
    (work / ".processes").unlink(missing_ok=True)


def _rows(work: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in work.glob("part-*.parquet"))


def _check_backends(cfg: GenerateTeacherDataConfig, specs: list[str]) -> bool:
    """Whether every teacher runs in process (transformers); a served or vLLM teacher is
    one teacher alone, without the options only an in-process model has."""
    backends = {backend_of(resolve(s, cfg.teacher)[0], cfg.teacher.backend) for s in specs}
    if backends == {"transformers"}:
        return True
    if len(specs) > 1:
        raise DistilError("several teachers (for mst) must be model directories run in process; pass one served or vLLM teacher")
    if cfg.decode != "greedy" or cfg.routing == "on":
        raise DistilError(
            f"decode={cfg.decode} and routing=on read an MoE teacher's internals: run it in process (a model directory)"
        )
    return False


def _check_chat(prompts: list[dict], cfg: GenerateTeacherDataConfig, specs: list[str], local: bool) -> bool:
    """Whether chat rows go to a served teacher's chat API (each as its one user message);
    chat rows a served teacher cannot be given are refused before any server is asked."""
    chats = [r for r in prompts if r.get(MESSAGES)]
    if local or not chats or backend_of(resolve(specs[0], cfg.teacher)[0], cfg.teacher.backend) != "http":
        return False
    if cfg.teacher.api == "completions":
        if not cfg.teacher.tokenizer:
            raise DistilError(
                "chat prompts through teacher.api=completions are rendered locally with the teacher's chat template: set "
                "teacher.tokenizer to the teacher's tokenizer dir, or teacher.api=chat to let the server apply its own"
            )
        return False
    for r in chats:
        turns = prompt_turns(from_json(r[MESSAGES]))
        if len(turns) > 1:
            raise DistilError(
                f"prompt {r['id']} has {len(turns)} messages (a system message or several turns), but teacher.api=chat sends "
                "each prompt as one user message; use teacher.api=completions with teacher.tokenizer set (rendered locally)"
            )
    return True


def _chat_prompts(chunk: list[dict], teacher, chat_api: bool) -> tuple[list[dict], list[str]]:
    """(the part's rows, a chat row's ``prompt`` rendered as this teacher reads it and its
    ``messages`` the turns before any final assistant one; the prompts to send: the rendered
    text, or through the chat API the one user message)."""
    rows, sent = [], []
    for r in chunk:
        if not r.get(MESSAGES):
            rows.append(r)
            sent.append(r["prompt"])
            continue
        turns = prompt_turns(from_json(r[MESSAGES]))
        tok = teacher.tokenizer
        text = render(tok, turns, add_generation_prompt=True) if tok is not None else plain(turns, add_generation_prompt=True)
        rows.append({**r, "prompt": text, MESSAGES: to_json(turns)})
        sent.append(turns[-1]["content"] if chat_api else text)
    return rows, sent


def _open(cfg: GenerateTeacherDataConfig, spec, device, local: bool):
    """The ``Teacher`` of one spec; an in-process one with SCMoE decoding when asked; with
    ``agent.tool`` set, one whose completions are agent trajectories (``stages.lm.agent.runner``)."""
    if not local:
        teacher = open_teacher(spec, cfg.teacher, device)
    else:
        model, tokenizer = load_lm(spec, device)
        teacher = open_teacher(spec, cfg.teacher, device, model=model, tokenizer=tokenizer, decode=decoding(cfg, model, spec))
    if cfg.agent.tool == "none":
        return teacher
    from stages.lm.agent.runner import AgentTeacher

    return AgentTeacher(teacher, cfg.agent)


def _remote_entry(teacher) -> dict:
    """The manifest entry of a served teacher: its identity (URL, model name; never a key)."""
    tok = teacher.tokenizer
    return {**teacher.identity, "path": teacher.identity.get("url"), "vocab_size": len(tok) if tok is not None else None, "tasks": []}


def _text_only(teacher, top_k: int) -> str | None:
    """Why a served teacher's samples are stored as text only (None: its token ids are
    this tokenizer's, checked)."""
    if teacher.tokenizer is None:
        return "no local tokenizer names the server's ids (set teacher.tokenizer to the teacher's model or tokenizer dir)"
    if not getattr(teacher, "same_tokenizer", True):
        return getattr(teacher, "why_text_only", "the server's tokenizer differs from teacher.tokenizer")
    return None


def _stored_k(work: Path) -> int | None:
    """The top-k width of the parts already written (a resumed run keeps it); None before any."""
    for part in sorted(work.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["token_ids", "topk_ids"])
        for ids, top in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
            if ids:
                return len(top) // len(ids)
    return None


def _uniform_k(done: list, k_store: int | None, text_only: bool, spec) -> int:
    """One top-k width for the whole table: the smallest a server returned in the first part
    (it may give fewer than asked); a later part that gives fewer is an error."""
    if text_only:
        return 0
    if any(c.token_ids is None for c in done):
        raise DistilError(
            f"teacher {spec} returned tokens that do not map to teacher.tokenizer's ids; the tokenizers differ: "
            "set teacher.tokenizer='' to store text only"
        )
    ks = [c.k for c in done if c.token_ids]
    if not ks:
        return k_store or 0
    if k_store is None:
        return min(ks)
    if min(ks) < k_store:
        raise DistilError(f"teacher {spec} returned {min(ks)} top log-probs per token after {k_store} earlier; rerun with top_k={min(ks)}")
    return k_store


def _records(chunk: list[dict], done: list, score, *, teacher: int, teachers: int, samples: int,
             k: int) -> tuple[list[dict], float]:  # fmt: skip
    """The teacher-data rows of one part: per sample its prompt, parsed answer and score,
    the sample's tokens with ``k`` top log-probs each (``topk_format`` 2, ``stages.lm.topk_codec``),
    finish reason and usage; ids are unique over prompts, teachers and samples. Also the part's
    largest top-k log-prob error."""
    records, error = [], 0.0
    for j, c in enumerate(done):
        p = chunk[j // samples]
        answer, parse = (c.extra["answer"], "ok" if c.extra["answer"] else "no answer") if "answer" in c.extra else extract_answer(c.text)
        ids = c.token_ids or []
        top = encode(*_top_k(c, len(ids), k))
        error = max(error, top.max_error)
        records.append({
            "id": (p["id"] * teachers + teacher) * samples + j % samples, "prompt_id": p["id"],
            "sample": j % samples, "teacher": teacher,
            "split": p["split"], "task": p["task"], "item": p["item"], "prompt": p["prompt"], MESSAGES: p.get(MESSAGES),
            "gold": p["answer"],
            "answer": answer, "parse": parse, "score": score(p, answer), "completion": c.text,
            "seq_logprob": float("nan") if c.seq_logprob is None else c.seq_logprob, "token_ids": ids,
            "topk_ids": top.ids.reshape(-1), "topk_logprobs": None, "topk_codes": top.codes.reshape(-1),
            "topk_tail": top.tail, "expert_ids": c.extra.get("expert_ids", []),
            "expert_weights": c.extra.get("expert_weights", []), "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
        })  # fmt: skip
    return records, error


def _top_k(c, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of each token's top-k (a completion may carry more) as [n, k] ids and
    log-probs, in the precision the teacher gave them."""
    if k == 0 or n == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    ids, lp = np.asarray(c.topk_ids).reshape(n, c.k), np.asarray(c.topk_logprobs).reshape(n, c.k)
    return ids[:, :k], lp[:, :k]


def _write_manifest(work: Path, cfg: GenerateTeacherDataConfig, data, params: dict, inputs: dict, entries: list[dict],
                    routed: dict | None, *, teacher, rows: int, tokens: int, seconds: float, top_k: int | None,
                    text_only: str | None) -> None:  # fmt: skip
    """The manifest: the first teacher as ``model``, every teacher, the top-k width actually
    stored, and what generation cost (tokens over all parts, resumed ones included; speed
    and usage of this run's parts)."""
    size = sum(p.stat().st_size for p in work.glob("part-*.parquet"))
    all_tokens, usage = 0, {"prompt_tokens": 0, "completion_tokens": 0}
    for part in work.glob("part-*.parquet"):
        table = pq.read_table(part, columns=["token_ids", *usage])
        all_tokens += sum(len(ids) for ids in table.column("token_ids").to_pylist())
        for key in usage:
            usage[key] += sum(v or 0 for v in table.column(key).to_pylist())
    write_manifest(
        work, kind=Kind.LM_TEACHER_DATA, params=params, inputs=inputs, rows=rows,
        model={"path": str(teacher), "sha256": inputs["teacher"], "vocab_size": entries[0]["vocab_size"],
               "backend": entries[0].get("backend", "transformers")},
        extra={"task": {"name": str(data)}, "teachers": entries, "top_k": top_k or 0, "top_k_requested": cfg.top_k,
               "tokens": "text" if text_only else "ids", **({"text_only": text_only} if text_only else {}),
               "decode": cfg.decode, "tokens_generated": all_tokens, "usage": usage,
               "tokens_per_second": tokens / max(seconds, 1e-9), "bytes_per_token": size / max(all_tokens, 1),
               **TopKFormat(top_k or 0, FORMAT).manifest(max_error(sorted(work.glob("part-*.parquet")))),
               **({"routing": routed} if routed is not None else {}),
               **({"agent": to_dict(cfg.agent)} if cfg.agent.tool != "none" else {})},
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
