"""`distil distill` for language models: the data is a reasoning task or a prompt table.

``LM_METHODS`` lists what the LM track trains today: ``sft``, next-token cross-entropy
on the completion (gold answers, or later selected teacher completions), which also
trains an LM teacher from scratch. The student is written with ``save_pretrained`` with
its tokenizer and loads in plain transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from stages.artifacts import Output, fingerprint, write_json, write_manifest
from stages.config import DataConfig, DistillConfig, to_dict
from stages.errors import DistilError
from stages.lm_training import encode, fit_lm
from stages.models import resolve_device
from stages.models.lm import LMSize, build_lm, load_lm, train_tokenizer
from stages.progress import progress_bar
from stages.tasks import load_prompts, source_identity

LM_METHODS = {"sft": "next-token cross-entropy on completions (gold answers or selected teacher completions)"}


def run_lm(
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
    if teachers:
        raise DistilError("sft learns from completions in the data, not from a live teacher; drop --teacher")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.grad_accum < 1:
        raise DistilError("epochs, batch_size, grad_accum and lr must be positive")
    dev_ = resolve_device(device)
    table, _ = load_prompts(data, data_cfg)
    rows = [r for r in table.to_pylist() if r["answer"] is not None and str(r["answer"]).strip()]
    train = [r for r in rows if r["split"] == "train"]
    dev = [r for r in rows if r["split"] == "dev"]
    if not train or not dev:
        raise DistilError(f"{data} needs answered prompts in both the train and dev splits for sft")
    lm = cfg.lm
    if lm.init:
        model, tokenizer = load_lm(lm.init, dev_)
    else:
        tokenizer = train_tokenizer((r["prompt"] + " " + r["answer"] for r in train), lm.vocab_size)
        size = LMSize(lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.intermediate, lm.context)
        model = build_lm(lm.family, size, tokenizer, seed=cfg.seed).to(dev_)
    max_len = min(
        lm.context, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", lm.context)
    )
    pairs = {
        name: [encode(tokenizer, r["prompt"], r["answer"], max_len) for r in split]
        for name, split in (("train", train), ("dev", dev))
    }

    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data) if Path(data).exists() else f"task:{data}"}
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        from dvclive import Live

        resuming = (work / "checkpoint").exists()
        with (
            Live(dir=str(work / "dvclive"), save_dvc_exp=False, dvcyaml=None, resume=resuming, report=None) as live,
            progress_bar(progress) as bar,
        ):
            torch.manual_seed(cfg.seed)
            summary = fit_lm(
                model, pairs["train"], pairs["dev"], cfg, work, pad_id=tokenizer.pad_token_id, device=dev_, bar=bar, live=live
            )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        summary = {
            "method": cfg.method,
            "params": sum(p.numel() for p in model.parameters()),
            "train_rows": len(train),
            **summary,
        }
        write_json(work / "training.json", summary)
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
        headline = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        write_manifest(work, kind="lm", params=params, inputs=inputs, extra={"task": {"name": str(data)}, "training": headline})
        return output.commit()
