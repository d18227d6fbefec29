"""`distil distill` for language models: the data is a reasoning task or a prompt table.

``LM_METHODS`` lists what the LM track trains: ``sft``, next-token cross-entropy on the
completion (gold answers, which also trains an LM teacher from scratch, or teacher
completions), and the token-level divergences of section 1 against the top-k teacher
log-probs stored by ``generate-teacher-data`` (FIRST's "concentrated knowledge"): the
sparse path of ``stages.losses`` reads k ids and log-probs per token plus one "other"
bucket, never a full-vocabulary distribution. The student is written with ``save_pretrained`` with
its tokenizer and loads in plain transformers. ``mst`` is ``kd`` on the rows of the one
teacher a gate picks per prompt, on teacher data from several teachers (``stages.lm.methods.mst``).
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
from stages.lm.methods import LM_METHODS
from stages.lm.models import LMSize, build_lm, check_same_tokenizer, lm_identity, load_lm, load_tokenizer, train_tokenizer
from stages.lm.teachers.vocabulary import shared_tokenizer
from stages.lm.training import IGNORE, RowSource, collate, encode, encode_tokens, fit_lm, token_ce
from stages.losses import DIVERGENCES, divergence_hyper
from stages.runlog import finish, logged
from stages.tasks import load_prompts, source_identity


def on_policy_loss(cfg: DistillConfig, teacher, tokenizer, max_len: int):
    """Generalised knowledge distillation (Agarwal et al., "On-Policy Distillation of
    Language Models", ICLR 2024, algorithm 1; the on-policy distillation survey): with
    probability ``lmbda`` a batch's completions are sampled from the student itself,
    otherwise they are the data's; the live teacher scores every completion token and the
    student minimises the chosen divergence (``jsd`` with ``beta``) on those tokens. Training
    on its own samples is what keeps a student from exploiting a fixed teacher dataset
    ("On Teacher Hacking")."""
    divergence, hyper = DIVERGENCES["jsd"], divergence_hyper("jsd", cfg)
    rng = torch.Generator().manual_seed(cfg.seed)

    def loss(m, b):
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        if torch.rand(1, generator=rng).item() < cfg.lmbda:
            ids, mask, labels = _student_samples(m, tokenizer, ids, labels, max_len, cfg.lm.max_new_tokens)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        logits = m(input_ids=ids, attention_mask=mask).logits
        keep = labels[:, 1:] != IGNORE
        return divergence(logits[:, :-1], t_logits[:, :-1], mask=keep, weight=b["w"][:, None].expand_as(keep), **hyper)

    return loss


@torch.no_grad()
def _student_samples(model, tokenizer, ids, labels, max_len, max_new):
    """Replace each row's completion by one the student samples (temperature 1)."""
    prompts = []
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        prompts.append(row[: next(i for i, v in enumerate(lab) if v != IGNORE)])
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    left = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=ids.device)
    attn = (
        torch.arange(width, device=ids.device)[None, :]
        >= torch.tensor([width - len(p) for p in prompts], device=ids.device)[:, None]
    ).long()
    was = model.training
    model.eval()
    gen = model.generate(input_ids=left, attention_mask=attn, do_sample=True, temperature=1.0, max_new_tokens=max(1, min(max_new, max_len - width)),
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)[:, width:]  # fmt: skip
    model.train(was)
    rows = []
    for p, g in zip(prompts, gen.tolist(), strict=True):
        g = g[: g.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in g else g
        rows.append((p + g, [IGNORE] * len(p) + g))
    batch = collate(rows, pad)
    return batch["input_ids"].to(ids.device), batch["attention_mask"].to(ids.device), batch["labels"].to(ids.device)


def _teacher_tokenizer_if_any(manifest: dict):
    """A student learning from teacher samples splits text the teacher's way when it can:
    the tokens it learns are the teacher's own (and token-level methods stay open to it). If
    the teacher is gone, sft trains its own tokenizer on the data instead."""
    try:
        return load_tokenizer(manifest.get("model", {}).get("path", ""))
    except DistilError:
        return None


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


def _token_selection(logits, teacher, mask, cfg):
    """TSD-KD's direct distillation (Explain in Your Own Words, section 3.2): keep only the
    tokens where the teacher's top-1 probability exceeds the student's probability of that
    token by more than ``tsd_margin`` (relative confidence), and add ``tsd_entropy`` times
    the student's mean entropy on completion tokens, which keeps the student confident.
    The indirect (re-ranking) half of TSD-KD needs a live teacher and is not part of this."""
    ids, logp = teacher
    s_logp = torch.log_softmax(logits.float(), dim=-1)
    t_top = logp[..., 0].exp()  # stored top-k is sorted: index 0 is the teacher's top-1
    s_on_top = s_logp.gather(-1, ids[..., :1]).squeeze(-1).exp()
    selected = mask & (t_top - s_on_top.detach() > cfg.tsd_margin)
    entropy = -(s_logp.exp() * s_logp).sum(-1)
    penalty = cfg.tsd_entropy * (entropy * mask).sum() / mask.sum().clamp_min(1)
    return selected, penalty


def _target(row: dict) -> str:
    """What sft learns to produce: a teacher's completion, else the gold answer."""
    return row["completion"] if "completion" in row else row["answer"]


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
    if cfg.method not in LM_METHODS:
        raise DistilError(f"method '{cfg.method}' is not available for language models yet; LM methods: {', '.join(LM_METHODS)}")
    on_policy = cfg.method == "on-policy"
    if on_policy and len(teachers) != 1:
        raise DistilError("on-policy needs exactly one live teacher; pass --teacher DIR")
    if teachers and not on_policy:
        raise DistilError(f"method '{cfg.method}' learns from teacher data on disk, not from a live --teacher; drop --teacher")
    if not 0 <= cfg.lmbda <= 1:
        raise DistilError(f"lmbda must be in [0, 1], got {cfg.lmbda}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.grad_accum < 1 or cfg.steps < 0:
        raise DistilError("epochs, batch_size, grad_accum and lr must be positive (and steps >= 0)")
    if cfg.lm.tokenizer and cfg.lm.init:
        raise DistilError("lm.tokenizer is for a model built from a config; a model from lm.init keeps its own: drop one")
    dev_ = resolve_device(device)
    gated: dict = {}  # mst: the gate's choices, for training.json
    manifest = read_manifest(Path(data)) if Path(data).is_dir() else {}
    teacher_data = manifest.get("kind") in ("lm_teacher_data", "lm_selection")
    token_level = cfg.method not in ("sft", "on-policy")
    if token_level and not teacher_data:
        raise DistilError(
            f"method '{cfg.method}' needs LM teacher data with top-k log-probs; run `distil generate-teacher-data` first"
        )
    if teacher_data:
        if token_level and not manifest.get("top_k"):
            raise DistilError(f"{data} stores no top-k log-probs (top_k = 0); regenerate it with generate_teacher_data.top_k > 0")
        files = sorted(Path(data).glob("part-*.parquet"))

        def part_loader(f, split):
            def load():
                return [
                    r for r in pq.read_table(f).to_pylist() if r["split"] == split and (r["token_ids"] or r["completion"].strip())
                ]

            return load

        def count(f, split):
            return sum(s == split for s in pq.read_table(f, columns=["split"]).column(0).to_pylist())

        if cfg.method == "mst":  # only the rows of the teacher the gate picks for each prompt
            from stages.lm.methods.mst import gate_rows

            part_loader, count, gated = gate_rows(part_loader, files, manifest, cfg, data)
        if cfg.demos > 0:
            part_loader = _with_demos(part_loader, files, cfg)
        sources = {
            split: ([part_loader(f, split) for f in files], [count(f, split) for f in files]) for split in ("train", "dev")
        }
    else:
        if cfg.demos > 0:
            raise DistilError("demos > 0 trains on prompts with teacher demonstrations: pass teacher data (or a selection)")
        table, _ = load_prompts(data, data_cfg)
        rows = [r for r in table.to_pylist() if r["answer"] is not None and str(r["answer"]).strip()]
        sources = {split: ([lambda s=split: [r for r in rows if r["split"] == s]], [sum(r["split"] == split for r in rows)])
                   for split in ("train", "dev")}  # fmt: skip
    if not sum(sources["train"][1]) or not sum(sources["dev"][1]):
        raise DistilError(f"{data} needs answered prompts in both the train and dev splits for {cfg.method}")
    lm = cfg.lm
    teacher_tok = live = None
    if teacher_data and token_level:
        teacher_tok = load_tokenizer(manifest["model"]["path"])
    elif teacher_data and not lm.init and not lm.tokenizer:
        teacher_tok = _teacher_tokenizer_if_any(manifest)
    if on_policy:
        live, teacher_tok = load_lm(teachers[0], dev_)
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
    max_len = min(
        lm.context, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", lm.context)
    )
    k = manifest.get("top_k", 0)

    def encode_row(r: dict) -> tuple:
        w = r.get("weight", 1.0)
        if not token_level:
            return (*encode(tokenizer, r["prompt"], _target(r), max_len), None, None, w)
        ids, labels = encode_tokens(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"], r["token_ids"], max_len)
        n = len(r["token_ids"])
        return ids, labels, np.asarray(r["topk_ids"]).reshape(n, k), np.asarray(r["topk_logprobs"], np.float32).reshape(n, k), w

    pairs = {split: RowSource(*sources[split], encode_row) for split in ("train", "dev")}
    loss_fn = on_policy_loss(cfg, live, tokenizer, max_len) if on_policy else None
    if token_level:
        base = "kd" if cfg.method in ("tsd", "mst") else cfg.method
        divergence, hyper = DIVERGENCES[base], divergence_hyper(base, cfg)

        def loss_fn(m, b):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            mask = b["labels"][:, 1:] != IGNORE  # logits[t] predicts token t + 1; the teacher's top-k sits at t
            teacher = (b["t_ids"][:, :-1], b["t_logprobs"][:, :-1])
            extra = 0.0
            if cfg.method == "tsd":
                mask, extra = _token_selection(logits[:, :-1], teacher, mask, cfg)
            row_w = b["w"][:, None].expand_as(mask)
            distil = divergence(logits[:, :-1], teacher, mask=mask, weight=row_w, **hyper) + extra
            if cfg.alpha >= 1:
                return distil
            return cfg.alpha * distil + (1 - cfg.alpha) * token_ce(logits, b["labels"], b["w"])

    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data) if Path(data).exists() else f"task:{data}",
              "teacher": lm_identity(teachers[0])["sha256"] if on_policy else ""}  # fmt: skip
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        with logged(work, progress) as (live, bar):
            torch.manual_seed(cfg.seed)
            summary = fit_lm(model, pairs["train"], pairs["dev"], cfg, work, pad_id=tokenizer.pad_token_id, device=dev_,
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
