"""`distil distill` for language models: the data is a reasoning task, a prompt table, or
LM teacher data (or a selection of it).

``run`` is a sequence of named steps: check the method against its declaration in
``stages.lm.methods.LM_METHODS`` (what teacher it needs), gather the training rows per split
(gold answers, or teacher samples read part by part, narrowed by the ``mst`` gate and given
retrieved demonstrations with ``demos``), build or load the student on the right tokenizer,
encode the rows, build the method's loss (``methods.token_level``: the top-k divergences of
``stages.losses`` against the log-probs ``generate-teacher-data`` stored; ``methods.on_policy``:
GKD against a live teacher; none: ``sft``'s next-token cross-entropy) and train it with
``stages.lm.training.fit``. The student is written with ``save_pretrained`` with its
tokenizer and loads in plain transformers. Chat rows (``messages``) are rendered with the
student's chat template, ``lm.chat_template`` installed on its tokenizer first
(``stages.lm.chat``), and the loss covers the assistant turns only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import Kind, Output, fingerprint, read_manifest
from stages.config import DataConfig, DistillConfig, to_dict
from stages.devices import resolve_device
from stages.distributed import main_first, ranks
from stages.errors import DistilError
from stages.lm import lora
from stages.lm.agent.trajectory import encode as encode_trajectory
from stages.lm.chat import encode_chat, install_template, training_conversation
from stages.lm.methods import LM_METHODS, LMMethod
from stages.lm.models import (
    LMSize,
    build_lm,
    check_same_tokenizer,
    keep_layers,
    lm_identity,
    load_lm,
    load_tokenizer,
    train_tokenizer,
)  # fmt: skip
from stages.lm.teachers import open_teacher
from stages.lm.teachers.vocabulary import shared_tokenizer
from stages.lm.topk_codec import TopKFormat
from stages.lm.training import RowSource, encode, encode_tokens, fit
from stages.modality import LM
from stages.runlog import finish, logged
from stages.tasks import load_prompts, source_identity
from stages.tasks.messages import MESSAGES

SPLITS = ("train", "dev")


def run(
    cfg: DistillConfig,
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    teachers: list[Path] | tuple = (),
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train a student with ``cfg.method`` on ``data`` and write it to ``out``."""
    method = _check(cfg, teachers)
    dev_ = resolve_device(device)
    manifest = read_manifest(Path(data)) if Path(data).is_dir() else {}
    teacher_data = manifest.get("kind") in (Kind.LM_TEACHER_DATA, Kind.LM_SELECTION)
    verifier = _verifier(cfg, data, data_cfg, teacher_data) if method.reward else None
    sources, gated = _sources(cfg, method, data, data_cfg, manifest, teacher_data)
    model, tokenizer, live, teacher_tok = _student(cfg, method, manifest, teacher_data, sources, teachers, dev_)
    max_len = min(
        cfg.lm.context,
        getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", cfg.lm.context),
    )
    install_template(tokenizer, cfg.lm.chat_template)  # saved with the student: it renders chats as it was trained
    topk = TopKFormat.of(manifest)
    encode_row = _encoder(tokenizer, max_len, topk.k, method.token_level, last_only=method.teacher == "live" or method.reward,
                          topk=topk)  # fmt: skip
    if verifier is not None:
        encode_row = verifier.tagging(encode_row)
    if method.cross_tokenizer:
        from stages.lm.methods.cross_tokenizer import cross_encoder

        encode_row = cross_encoder(teacher_tok, tokenizer, max_len, topk.k, topk=topk)
    pairs = {split: RowSource(*sources[split], encode_row) for split in SPLITS}
    loss_fn = _loss(method, cfg, live, tokenizer, max_len, verifier)
    teacher_id = live.identity["sha256"] if live is not None else ""
    if hasattr(loss_fn, "prepare"):  # a method with a phase of its own before training (sd-zero's self-revision)
        loss_fn.prepare(model, pairs["train"], dev_)
    return _train(cfg, data, data_cfg, out, model, tokenizer, pairs, loss_fn,
                  gated=gated, teacher_id=teacher_id, device=dev_, progress=progress)  # fmt: skip


def _check(cfg: DistillConfig, teachers) -> LMMethod:
    """The method, once its settings and the --teacher it needs are checked."""
    if cfg.method not in LM_METHODS:
        raise DistilError(f"method '{cfg.method}' is not available for language models yet; LM methods: {', '.join(LM_METHODS)}")
    method = LM_METHODS[cfg.method]
    live = method.teacher == "live"
    if live and len(teachers) != 1:
        raise DistilError(f"{cfg.method} needs exactly one live teacher; pass --teacher DIR (or a server URL)")
    if teachers and not live:
        raise DistilError(f"method '{cfg.method}' learns from teacher data on disk, not from a live --teacher; drop --teacher")
    if not 0 <= cfg.lmbda <= 1:
        raise DistilError(f"lmbda must be in [0, 1], got {cfg.lmbda}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.grad_accum < 1 or cfg.steps < 0:
        raise DistilError("epochs, batch_size, grad_accum and lr must be positive (and steps >= 0)")
    if cfg.lm.tokenizer and cfg.lm.init:
        raise DistilError("lm.tokenizer is for a model built from a config; a model from lm.init keeps its own: drop one")
    return method


def _sources(cfg: DistillConfig, method: LMMethod, data, data_cfg: DataConfig, manifest: dict, teacher_data: bool):
    """(per split: (row loaders, row counts), the ``mst`` gate's summary for training.json)."""
    if method.token_level and not teacher_data:
        raise DistilError(
            f"method '{cfg.method}' needs LM teacher data with top-k log-probs; run `distil generate-teacher-data` first"
        )
    if method.contrastive and not teacher_data:
        raise DistilError(f"method '{cfg.method}' contrasts teacher samples with the student's: pass LM teacher data "
                          "(`distil generate-teacher-data` with samples > 1, for self-consistency)")  # fmt: skip
    if teacher_data:
        sources, gated = _teacher_data_sources(cfg, method, data, manifest)
    else:
        sources, gated = _prompt_sources(cfg, data, data_cfg), {}
    if not sum(sources["train"][1]) or not sum(sources["dev"][1]):
        raise DistilError(f"{data} needs answered prompts in both the train and dev splits for {cfg.method}")
    return sources, gated


def _teacher_data_sources(cfg: DistillConfig, method: LMMethod, data, manifest: dict):
    """Teacher samples, one part file at a time: only the gate's teacher per prompt for a
    ``gated`` method, with retrieved demonstrations in the prompt when ``demos`` > 0."""
    if method.token_level and manifest.get("tokens") == "text":
        raise DistilError(f"{data} holds the teacher's text only (top_k = 0): {manifest.get('text_only')}; "
                          f"{cfg.method} compares token distributions: train sft on it, or regenerate with teacher.tokenizer set")  # fmt: skip
    if method.token_level and not manifest.get("top_k"):
        raise DistilError(f"{data} stores no top-k log-probs (top_k = 0); regenerate it with generate_teacher_data.top_k > 0")
    files = sorted(Path(data).glob("part-*.parquet"))
    part_loader = partial(_part_loader, topk=TopKFormat.of(manifest)) if method.token_level else _part_loader
    count, gated = _count, {}
    if method.gated:
        from stages.lm.methods.mst import gate_rows

        part_loader, count, gated = gate_rows(part_loader, files, manifest, cfg, data)
    if method.contrastive:
        from stages.lm.methods.qcrd import qcrd_rows

        part_loader, count = qcrd_rows(part_loader, files, data)
    if cfg.demos > 0:
        part_loader = _with_demos(part_loader, files, cfg)
    if manifest.get("agent"):
        part_loader = _as_trajectories(part_loader)
    return {split: ([part_loader(f, split) for f in files], [count(f, split) for f in files]) for split in SPLITS}, gated


def _part_loader(f: Path, split: str, topk: TopKFormat | None = None):
    """A loader of one part's ``split`` rows that hold a completion; with ``topk``, each row's
    stored top-k decoded for the whole part at once (``TopKFormat.rows``: a ``topk`` entry)."""

    def load():
        table = pq.read_table(f)
        rows = topk.rows(table) if topk is not None else table.to_pylist()
        return [r for r in rows if r["split"] == split and (r["token_ids"] or r["completion"].strip())]

    return load


def _count(f: Path, split: str) -> int:
    return sum(s == split for s in pq.read_table(f, columns=["split"]).column(0).to_pylist())


def _with_demos(part_loader, files: list[Path], cfg: DistillConfig):
    """``part_loader`` whose rows carry ``cfg.demos`` retrieved teacher demonstrations in
    their prompt (the ICD-ready student of METHODS.md section 6; the bank is the train rows
    of this teacher data, built as ``distil cascade`` builds it, so served prompts match)."""
    from stages.lm.icd.bank import icd_prompts

    if any(_holds_chats(f) for f in files):
        raise DistilError("demos > 0 puts demonstrations into text prompts, but this teacher data holds chats: set demos=0")
    cols = ["prompt_id", "sample", "split", "prompt", "answer", "score", "token_ids"]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    train = sorted((r for r in table.to_pylist() if r["split"] == "train"), key=lambda r: (r["prompt_id"], r["sample"]))
    prompts = icd_prompts(train, table.column("prompt").to_pylist(), cfg.demos, kind=cfg.retriever, embedder=cfg.embedder)

    def loader(f, split):
        load = part_loader(f, split)
        return lambda: [dict(r, prompt=prompts[r["prompt"]]) for r in load()]

    return loader


def _holds_chats(f: Path) -> bool:
    """Whether a teacher-data part has chat rows (a non-null ``messages``)."""
    if MESSAGES not in pq.read_schema(f).names:
        return False
    column = pq.read_table(f, columns=[MESSAGES]).column(0)
    return column.null_count < len(column)


def _verifier(cfg: DistillConfig, data, data_cfg: DataConfig, teacher_data: bool):
    """A reward method's ``Verifier`` of the training prompts (the task's scorer), once the data is checked."""
    from stages.lm.methods.reward import Verifier, check_reward_data
    from stages.lm.scoring import scorer

    table, task = (None, None) if teacher_data else load_prompts(data, data_cfg)
    check_reward_data(cfg, data, teacher_data, table, task)
    return Verifier(scorer(task))


def _prompt_sources(cfg: DistillConfig, data, data_cfg: DataConfig) -> dict:
    """The answered prompts of a task or prompt table (gold answers to train on)."""
    if cfg.demos > 0:
        raise DistilError("demos > 0 trains on prompts with teacher demonstrations: pass teacher data (or a selection)")
    table, _ = load_prompts(data, data_cfg)
    rows = [r for r in table.to_pylist() if r["answer"] is not None and str(r["answer"]).strip()]
    if data_cfg.target != "answer":
        rows = [_rendered(r, data_cfg.target, data) for r in rows]
    return {split: ([lambda s=split: [r for r in rows if r["split"] == s]], [sum(r["split"] == split for r in rows)])
            for split in SPLITS}  # fmt: skip


def _rendered(row: dict, target: str, data) -> dict:
    """A gold row whose completion is its answer written out as ``target`` (``data.target``):
    the running sums (cot) or a verified code-tool trajectory (agent, ``stages.lm.agent``)."""
    from stages.lm.agent.trajectory import gold, gold_cot

    if row.get(MESSAGES):
        raise DistilError(f"data.target={target} writes out answers of text prompts; {data} gives chats: set data.chat=false")
    text = gold_cot(row["prompt"], row["answer"]) if target == "cot" else gold(row["prompt"], row["answer"])
    if text is None:
        raise DistilError(f"data.target={target} needs questions that end in a sum of integers ('... 41234 + 50023 - 812 ='); "
                          f"row {row['id']} of {data} does not: use data.target=answer")  # fmt: skip
    return dict(row, completion=text, trajectory=target == "agent")


def _as_trajectories(part_loader):
    """``part_loader`` of agent teacher data: its rows' completions are trajectories (observations masked)."""
    return lambda f, split: (lambda load=part_loader(f, split): [dict(r, trajectory=True) for r in load()])


def _student(cfg: DistillConfig, method: LMMethod, manifest: dict, teacher_data: bool, sources: dict, teachers, dev_):
    """(student, its tokenizer, the live teacher or None, the teacher's tokenizer or None). A student built from a config
    takes ``lm.tokenizer``, else the teacher's, else one trained on the training text; it
    must split text as the teacher does whenever it learns from the teacher's tokens (cross-tokenizer
    methods excepted: they align the two tokenisations by characters). A
    pretrained student (``lm.init`` / ``--student``) keeps its own tokenizer and, with
    ``lora.r`` > 0, trains a LoRA adapter only (``stages.lm.lora``)."""
    lm = cfg.lm
    if cfg.lora.r > 0 and not lm.init:
        raise DistilError("lora.r > 0 adapts a pretrained student: pass --student DIR or NAME (lm.init); "
                          "a student built from a config has no pretrained weights to adapt")  # fmt: skip
    teacher_tok = live = None
    if teacher_data and method.token_level:
        teacher_tok = load_tokenizer(manifest["model"]["path"])
    elif teacher_data and not lm.init and not lm.tokenizer:
        teacher_tok = _teacher_tokenizer_if_any(manifest)
    if method.teacher == "live":
        live = open_teacher(teachers[0], cfg.teacher, dev_)
        teacher_tok = live.tokenizer
        if teacher_tok is None:
            raise DistilError(
                f"{cfg.method} scores the student's tokens with the teacher: set teacher.tokenizer to the served teacher's tokenizer dir"
            )
    if lm.keep_layers and not lm.init:
        raise DistilError("lm.keep_layers prunes a pretrained student: pass --student DIR or NAME (lm.init), or set lm.layers")
    if lm.init:
        model, tokenizer = load_lm(lm.init, dev_)
        if lm.keep_layers:
            keep_layers(model, lm.keep_layers)
    else:
        texts = (r["prompt"] + " " + _target(r) for load in sources["train"][0] for r in load())
        tokenizer = (
            (shared_tokenizer(lm.tokenizer) if lm.tokenizer else None) or teacher_tok or train_tokenizer(texts, lm.vocab_size)
        )
        size = LMSize(lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.intermediate, lm.context, lm.experts,
                      lm.experts_per_token, lm.router_aux_loss)  # fmt: skip
        model = build_lm(lm.family, size, tokenizer, seed=cfg.seed).to(dev_)
    if teacher_tok is not None and not method.cross_tokenizer:
        check_same_tokenizer(teacher_tok, tokenizer, cfg.method)
    return _trainable(model, cfg), tokenizer, live, teacher_tok


def _trainable(model, cfg: DistillConfig):
    """The student as it trains: activations recomputed in the backward pass with
    ``lm.gradient_checkpointing`` (non-reentrant, so a frozen base still passes gradients to
    an adapter), and wrapped in a LoRA adapter when ``lora.r`` > 0."""
    if cfg.lm.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DistilError(f"{type(model).__name__} does not support gradient checkpointing; set lm.gradient_checkpointing=false")
        _checkpointing(model, True)
    if cfg.lora.r > 0:
        torch.manual_seed(cfg.seed)  # the adapter's A matrices start random: the same ones in every run
        model = lora.wrap(model, cfg.lora, cfg.lm.init)
    return model


def _checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off: transformers 5 names it activation checkpointing
    (the old name warns), transformers 4 only knows the old name."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def with_student(cfg: DistillConfig, student: str | Path | None, data, data_cfg: DataConfig) -> DistillConfig:
    """``cfg`` with ``--student`` (a model directory, a shipped name or a hub name) as its
    ``lm.init``: one setting under two names, so naming both is refused; so is a student for
    data of another modality, whose run would ignore it."""
    from stages.modality import NAMES, of_data

    if not student:
        return cfg
    if (modality := of_data(data, data_cfg)) != LM:
        raise DistilError(f"--student names a language-model student, but '{data}' is {NAMES[modality]} data; drop --student")
    if cfg.lm.init:
        raise DistilError(f"--student {student} and lm.init={cfg.lm.init} (params or --set) both name the student; "
                          "pass only one of them")  # fmt: skip
    named = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, init=str(student)))
    if hasattr(cfg, "_given"):  # what check_modality reads: the keys this run set
        object.__setattr__(named, "_given", cfg._given)
    return named


def _teacher_tokenizer_if_any(manifest: dict):
    """A student learning from teacher samples splits text the teacher's way when it can:
    the tokens it learns are the teacher's own (and token-level methods stay open to it). If
    the teacher is gone, sft trains its own tokenizer on the data instead."""
    try:
        return load_tokenizer(manifest.get("model", {}).get("path", ""))
    except DistilError:
        return None


def _target(row: dict) -> str:
    """What sft learns to produce: a teacher's completion, else the gold answer."""
    return row["completion"] if "completion" in row else row["answer"]


def _encoder(tokenizer, max_len: int, k: int, token_level: bool, *, last_only: bool = False, topk: TopKFormat | None = None):
    """``encode_row(raw row)`` -> the tuple ``collate`` takes: text pairs re-tokenised, or
    (token-level) the teacher's own tokens with their stored top-k as [n, k] arrays.
    A chat row (``messages``) is rendered with the student's own template, the teacher's
    completion as its final assistant turn, the loss on assistant tokens only
    (``stages.lm.chat.encode_chat``; ``last_only``: the final turn, for on-policy methods,
    which sample and score one completion). Token-level methods keep the prompt as the
    teacher rendered it (the stored ``prompt``): the student shares the teacher's tokenizer,
    and the stored top-k follow that prompt's tokens; ``topk`` (default: format 1, ``k`` per
    token) decodes them."""
    topk = topk or TopKFormat(k)

    def encode_row(r: dict) -> tuple:
        w = r.get("weight", 1.0)
        if r.get(MESSAGES) and not token_level:
            try:
                return (*encode_chat(tokenizer, training_conversation(r), max_len, last_only=last_only), None, None, w)
            except DistilError as exc:
                raise DistilError(f"row {r['id']}: {exc}") from None
        if r.get("trajectory"):  # the tool wrote the observations: they are masked out of the loss
            return (*encode_trajectory(tokenizer, r["prompt"], r["completion"], max_len), None, None, w)
        if not token_level:
            return (*encode(tokenizer, r["prompt"], _target(r), max_len), None, None, w)
        ids, labels = encode_tokens(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"], r["token_ids"], max_len)
        top_ids, top_lp, _ = topk.row(r)
        return ids, labels, top_ids, top_lp, w

    return encode_row


def _loss(method: LMMethod, cfg: DistillConfig, live, tokenizer, max_len: int, verifier=None):
    """The method's ``loss(model, batch)``; None is ``fit``'s default, next-token CE (sft)."""
    if method.contrastive:
        from stages.lm.methods.qcrd import QCRDLoss

        return QCRDLoss(cfg, tokenizer, max_len)
    if method.reviser:
        from stages.lm.methods.sd_zero import SDZeroLoss

        return SDZeroLoss(method, cfg, tokenizer, max_len, verifier)
    if method.tempered_self:
        from stages.lm.methods.curio import CurioLoss

        return CurioLoss(cfg.lm.loss_chunk)
    if method.self_teacher:
        from stages.lm.methods.srpo import SelfDistillLoss

        return SelfDistillLoss(method, cfg, tokenizer, max_len, verifier, route_grpo=method.self_teacher == "routed")
    if method.reward:
        from stages.lm.methods.reward import RewardLoss

        return RewardLoss(method, cfg, live, tokenizer, max_len, verifier)
    if method.teacher == "live":
        from stages.lm.methods.on_policy import on_policy_loss

        return on_policy_loss(method, cfg, live, tokenizer, max_len)
    if method.cross_tokenizer:
        from stages.lm.methods.cross_tokenizer import cross_tokenizer_loss

        return cross_tokenizer_loss(method.divergence, cfg)
    if method.token_level:
        from stages.lm.methods.token_level import top_k_loss

        return top_k_loss(method, cfg)
    return None


def _train(cfg: DistillConfig, data, data_cfg: DataConfig, out: Path, model, tokenizer, pairs: dict, loss_fn, *,
           gated: dict, teacher_id: str, device, progress: bool) -> Path:  # fmt: skip
    """Fit the student (resumably, in ``out``'s work directory) and commit it with its
    tokenizer: the whole model, or a LoRA student's adapter (and merged weights with
    ``lora.merge``; the layout is in ``stages.lm.lora``)."""
    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data) if Path(data).exists() else f"task:{data}", "teacher": teacher_id}
    if cfg.lm.init:
        inputs["student"] = lm_identity(cfg.lm.init)["sha256"]
    output = Output(out, fingerprint("distill", params, inputs))
    rank, _ = ranks()
    with main_first():  # several processes: the first opens (or clears) the work directory, the others then share it
        work = output.open() if rank == 0 else output.dir
    with output if rank == 0 else contextlib.nullcontext(work):
        with logged(work, progress) if rank == 0 else contextlib.nullcontext((None, None)) as (live, bar):
            torch.manual_seed(cfg.seed)
            summary = fit(model, pairs["train"], pairs["dev"], cfg, work, pad_id=tokenizer.pad_token_id, device=device,
                          loss_fn=loss_fn, bar=bar, live=live)  # fmt: skip
        if rank != 0:  # one process writes the model
            return output.final
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if cfg.lm.gradient_checkpointing:
            _checkpointing(model, False)
        counts = lora.parameter_counts(model)
        if cfg.lora.r > 0:
            lora.save(model, tokenizer, work, merge=cfg.lora.merge)
        else:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
        student = {"init": cfg.lm.init} if cfg.lm.init else {}
        if cfg.lora.r > 0:
            student["lora"] = {"r": cfg.lora.r, "merged": cfg.lora.merge}
        rollouts = loss_fn.summary() if hasattr(loss_fn, "summary") else {}  # reward methods: their rollouts' rewards
        summary = {"method": cfg.method, **counts, **student, "train_rows": len(pairs["train"]), **gated, **summary, **rollouts}
        finish(work, summary, kind=Kind.LM_MODEL, params=params, inputs=inputs, extra={"task": {"name": str(data)}})
        return output.commit()
