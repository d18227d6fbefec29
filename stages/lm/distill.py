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
tokenizer and loads in plain transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.artifacts import Kind, Output, fingerprint, read_manifest
from stages.config import DataConfig, DistillConfig, to_dict
from stages.devices import resolve_device
from stages.errors import DistilError
from stages.lm.methods import LM_METHODS, LMMethod
from stages.lm.models import LMSize, build_lm, check_same_tokenizer, load_lm, load_tokenizer, train_tokenizer
from stages.lm.teachers import open_teacher
from stages.lm.teachers.vocabulary import shared_tokenizer
from stages.lm.training import RowSource, encode, encode_tokens, fit
from stages.runlog import finish, logged
from stages.tasks import load_prompts, source_identity

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
    sources, gated = _sources(cfg, method, data, data_cfg, manifest, teacher_data)
    model, tokenizer, live = _student(cfg, method, manifest, teacher_data, sources, teachers, dev_)
    max_len = min(
        cfg.lm.context,
        getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", cfg.lm.context),
    )
    encode_row = _encoder(tokenizer, max_len, manifest.get("top_k", 0), method.token_level)
    pairs = {split: RowSource(*sources[split], encode_row) for split in SPLITS}
    loss_fn = _loss(method, cfg, live, tokenizer, max_len)
    teacher_id = live.identity["sha256"] if live is not None else ""
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
    part_loader, count, gated = _part_loader, _count, {}
    if method.gated:
        from stages.lm.methods.mst import gate_rows

        part_loader, count, gated = gate_rows(part_loader, files, manifest, cfg, data)
    if cfg.demos > 0:
        part_loader = _with_demos(part_loader, files, cfg)
    return {split: ([part_loader(f, split) for f in files], [count(f, split) for f in files]) for split in SPLITS}, gated


def _part_loader(f: Path, split: str):
    """A loader of one part's ``split`` rows that hold a completion."""

    def load():
        return [r for r in pq.read_table(f).to_pylist() if r["split"] == split and (r["token_ids"] or r["completion"].strip())]

    return load


def _count(f: Path, split: str) -> int:
    return sum(s == split for s in pq.read_table(f, columns=["split"]).column(0).to_pylist())


def _with_demos(part_loader, files: list[Path], cfg: DistillConfig):
    """``part_loader`` whose rows carry ``cfg.demos`` retrieved teacher demonstrations in
    their prompt (the ICD-ready student of METHODS.md section 6; the bank is the train rows
    of this teacher data, built as ``distil cascade`` builds it, so served prompts match)."""
    from stages.lm.icd.bank import icd_prompts

    cols = ["prompt_id", "sample", "split", "prompt", "answer", "score", "token_ids"]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    train = sorted((r for r in table.to_pylist() if r["split"] == "train"), key=lambda r: (r["prompt_id"], r["sample"]))
    prompts = icd_prompts(train, table.column("prompt").to_pylist(), cfg.demos, kind=cfg.retriever, embedder=cfg.embedder)

    def loader(f, split):
        load = part_loader(f, split)
        return lambda: [dict(r, prompt=prompts[r["prompt"]]) for r in load()]

    return loader


def _prompt_sources(cfg: DistillConfig, data, data_cfg: DataConfig) -> dict:
    """The answered prompts of a task or prompt table (gold answers to train on)."""
    if cfg.demos > 0:
        raise DistilError("demos > 0 trains on prompts with teacher demonstrations: pass teacher data (or a selection)")
    table, _ = load_prompts(data, data_cfg)
    rows = [r for r in table.to_pylist() if r["answer"] is not None and str(r["answer"]).strip()]
    return {split: ([lambda s=split: [r for r in rows if r["split"] == s]], [sum(r["split"] == split for r in rows)])
            for split in SPLITS}  # fmt: skip


def _student(cfg: DistillConfig, method: LMMethod, manifest: dict, teacher_data: bool, sources: dict, teachers, dev_):
    """(student, its tokenizer, the live teacher or None). A student built from a config
    takes ``lm.tokenizer``, else the teacher's, else one trained on the training text; it
    must split text as the teacher does whenever it learns from the teacher's tokens."""
    lm = cfg.lm
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
    if lm.init:
        model, tokenizer = load_lm(lm.init, dev_)
    else:
        texts = (r["prompt"] + " " + _target(r) for load in sources["train"][0] for r in load())
        tokenizer = (
            (shared_tokenizer(lm.tokenizer) if lm.tokenizer else None) or teacher_tok or train_tokenizer(texts, lm.vocab_size)
        )
        size = LMSize(lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.intermediate, lm.context, lm.experts,
                      lm.experts_per_token, lm.router_aux_loss)  # fmt: skip
        model = build_lm(lm.family, size, tokenizer, seed=cfg.seed).to(dev_)
    if teacher_tok is not None:
        check_same_tokenizer(teacher_tok, tokenizer, cfg.method)
    return model, tokenizer, live


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


def _encoder(tokenizer, max_len: int, k: int, token_level: bool):
    """``encode_row(raw row)`` -> the tuple ``collate`` takes: text pairs re-tokenised, or
    (token-level) the teacher's own tokens with their stored top-k as [n, k] arrays."""

    def encode_row(r: dict) -> tuple:
        w = r.get("weight", 1.0)
        if not token_level:
            return (*encode(tokenizer, r["prompt"], _target(r), max_len), None, None, w)
        ids, labels = encode_tokens(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"], r["token_ids"], max_len)
        n = len(r["token_ids"])
        return ids, labels, np.asarray(r["topk_ids"]).reshape(n, k), np.asarray(r["topk_logprobs"], np.float32).reshape(n, k), w

    return encode_row


def _loss(method: LMMethod, cfg: DistillConfig, live, tokenizer, max_len: int):
    """The method's ``loss(model, batch)``; None is ``fit``'s default, next-token CE (sft)."""
    if method.teacher == "live":
        from stages.lm.methods.on_policy import on_policy_loss

        return on_policy_loss(method, cfg, live, tokenizer, max_len)
    if method.token_level:
        from stages.lm.methods.token_level import top_k_loss

        return top_k_loss(method, cfg)
    return None


def _train(cfg: DistillConfig, data, data_cfg: DataConfig, out: Path, model, tokenizer, pairs: dict, loss_fn, *,
           gated: dict, teacher_id: str, device, progress: bool) -> Path:  # fmt: skip
    """Fit the student (resumably, in ``out``'s work directory) and commit it with its tokenizer."""
    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data) if Path(data).exists() else f"task:{data}", "teacher": teacher_id}
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        with logged(work, progress) as (live, bar):
            torch.manual_seed(cfg.seed)
            summary = fit(model, pairs["train"], pairs["dev"], cfg, work, pad_id=tokenizer.pad_token_id, device=device,
                          loss_fn=loss_fn, bar=bar, live=live)  # fmt: skip
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        summary = {
            "method": cfg.method,
            "params": sum(p.numel() for p in model.parameters()),
            "train_rows": len(pairs["train"]),
            **gated,
            **summary,
        }
        finish(work, summary, kind=Kind.LM_MODEL, params=params, inputs=inputs, extra={"task": {"name": str(data)}})
        return output.commit()
