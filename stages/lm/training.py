"""Language-model training shared by the LM methods: sequence encoding with the prompt
masked out of the loss, padding (``collate``), rows streamed part by part (``RowSource``),
next-token cross-entropy, the MoE router's auxiliary loss, and ``fit``: an epoch loop through
accelerate (device placement, bf16 mixed precision on GPU, gradient accumulation) with
best/last checkpoint selection on dev loss and per-epoch resumable checkpoints
(safetensors + JSON, never pickle). Decoding lives in ``stages.lm.generation``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts import load_tensors, save_state, save_tensors
from stages.config import DistillConfig
from stages.errors import DistilError
from stages.runlog import restore

IGNORE = -100


def encode(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) for prompt + " " + completion + eos; labels are IGNORE on the
    prompt, so the loss counts only the completion. Raises if the prompt cannot fit."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + 1 >= max_len:
        raise DistilError(
            f"a prompt is {len(p)} tokens, longer than the context of {max_len}; raise lm.context or shorten the prompts"
        )
    c = c[: max_len - len(p)]
    return p + c, [IGNORE] * len(p) + c


def encode_tokens(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """``encode`` for a completion already in token ids (teacher samples)."""
    if len(prompt_ids) + 1 >= max_len:
        raise DistilError(f"a prompt is {len(prompt_ids)} tokens, longer than the context of {max_len}; raise lm.context")
    c = completion_ids[: max_len - len(prompt_ids)]
    return prompt_ids + c, [IGNORE] * len(prompt_ids) + c


def _first_label(labels) -> int:
    """The position of the first completion token (the first label that is not IGNORE)."""
    return next(j for j, v in enumerate(labels) if v != IGNORE)


def collate(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of rows ``(ids, labels[, topk_ids, topk_logprobs[, weight[, key]]])``.

    ``topk_*`` are [n_completion, k] arrays aligned with the completion tokens (or None):
    they become ``t_ids`` / ``t_logprobs`` [B, T, k] at the positions that predict each
    token. ``w`` [B] holds the row weights (1 without them), ``key`` [B] the row keys when given."""
    width, b = max(len(r[0]) for r in rows), len(rows)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    sparse = len(rows[0]) >= 4 and rows[0][2] is not None
    if sparse:
        k = rows[0][2].shape[1]
        t_ids = np.zeros((b, width, k), dtype=np.int64)
        t_lp = np.full((b, width, k), -1e4, dtype=np.float32)
    for i, r in enumerate(rows):  # numpy row writes: the per-row cost of torch indexing was ~10% of a tiny model's step
        x, y = r[0], r[1]
        ids[i, : len(x)] = x
        labels[i, : len(y)] = y
        mask[i, : len(x)] = 1
        if sparse:
            start = _first_label(y) - 1  # the position predicting the first completion token
            n = min(len(r[2]), len(x) - 1 - start)
            t_ids[i, start : start + n] = r[2][:n]
            t_lp[i, start : start + n] = r[3][:n]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels),
             "w": torch.tensor([float(r[4]) if len(r) > 4 else 1.0 for r in rows])}  # fmt: skip
    if sparse:
        batch.update(t_ids=torch.from_numpy(t_ids), t_logprobs=torch.from_numpy(t_lp))
    if len(rows[0]) > 5:  # the reward methods' row keys (``stages.lm.methods.reward.Verifier``)
        batch["key"] = torch.tensor([int(r[5]) for r in rows])
    return batch


class RowSource:
    """The encoded rows of one split, read part by part so memory holds one part at a time.

    ``parts`` are callables returning raw rows (dicts); ``encode_row`` turns a raw row into
    the tuple ``collate`` takes. An epoch visits the parts in a seeded order and shuffles
    rows within each part: deterministic for resuming, bounded in memory. Encoded parts
    are kept between epochs while their rows total at most ``cache_rows`` (token ids are
    small: a few hundred bytes a row), so a small dataset is read and tokenised once."""

    def __init__(self, parts: list, counts: list[int], encode_row, cache_rows: int = 200_000):
        self.parts, self.counts, self.encode_row = parts, counts, encode_row
        self.cache_rows, self._cache = cache_rows, {}

    def _encoded(self, p: int) -> list:
        if p in self._cache:
            return self._cache[p]
        rows = [self.encode_row(r) for r in self.parts[p]()]
        if sum(len(v) for v in self._cache.values()) + len(rows) <= self.cache_rows:
            self._cache[p] = rows
        return rows

    def __len__(self) -> int:
        return sum(self.counts)

    def raw(self):
        for load in self.parts:
            yield from load()

    def epoch(self, seed: int | None = None):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        order = torch.randperm(len(self.parts), generator=g).tolist() if g is not None else range(len(self.parts))
        for p in order:
            rows = self._encoded(p)
            idx = torch.randperm(len(rows), generator=g).tolist() if g is not None else range(len(rows))
            for i in idx:
                yield rows[i]


def batches(rows, size: int):
    batch = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over completion tokens (logits[t] predicts labels[t+1]),
    averaged over tokens, each token weighted by its row's ``weight`` [B] when given."""
    target = labels[:, 1:]
    per = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    w = (target != IGNORE).float()
    if weight is not None:
        w = w * weight[:, None].to(w.dtype)
    return (per * w).sum() / w.sum().clamp_min(1e-12)


class RouterAuxLoss:
    """The load-balancing loss of an MoE model's routers (Switch Transformer eq. 4, as
    transformers computes it from ``output_router_logits``), weighted by the config's
    ``router_aux_loss_coef`` and added to the training loss of the forward pass that made
    it. A no-op for dense models. Only grad-enabled training forwards count, so sampling
    and dev-loss passes do not leak into the loss."""

    def __init__(self, model):
        from stages.lm.models import is_moe

        self.model, self.value, self.handle = model, None, None
        if is_moe(model):
            model.config.output_router_logits = True
            self.coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
            self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if module.training and torch.is_grad_enabled() and getattr(output, "aux_loss", None) is not None:
            self.value = output.aux_loss

    def add_to(self, loss: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return loss
        loss, self.value = loss + self.coef * self.value.to(loss.device), None
        return loss

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.model.config.output_router_logits = False  # saved configs decode without router outputs


def fit(
    model,
    train: RowSource,
    dev: RowSource,
    cfg: DistillConfig,
    work: Path,
    *,
    pad_id: int,
    device: torch.device,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    bar=None,
    live=None,
) -> dict[str, Any]:
    """Train ``model`` in place (ending with its selected weights); return a summary.
    ``loss_fn(model, batch)`` defaults to next-token cross-entropy on the completions."""
    acc = _accelerator(cfg, device)
    if cfg.batch_size % acc.num_processes:
        raise DistilError(f"batch_size {cfg.batch_size} does not split over {acc.num_processes} processes (the global batch "
                          f"is shared evenly): set a multiple of {acc.num_processes}")  # fmt: skip
    loss_fn = loss_fn or functools.partial(next_token_loss, chunk=cfg.lm.loss_chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epochs, sched = _schedule(opt, len(train), cfg)
    aux = RouterAuxLoss(model)
    model, opt = acc.prepare(model, opt)
    ckpt = work / "checkpoint"
    progress = _resume(ckpt, acc.unwrap_model(model), opt, sched)
    ckpt.mkdir(parents=True, exist_ok=True)
    task = bar.add_task(f"{cfg.method} (lm)", total=epochs, completed=progress["epoch"], info="") if bar else None
    for epoch in range(progress["epoch"], epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, train.epoch(cfg.seed * 100_003 + epoch), loss_fn, aux, acc, opt, sched, cfg, pad_id)
        dev_loss = evaluate_loss(model, dev, cfg.batch_size, pad_id, acc.device, cfg.lm.loss_chunk)
        progress["seconds"] += time.perf_counter() - t0
        _end_epoch(progress, epoch, train_loss, dev_loss, live)
        best = cfg.checkpoint == "last" or dev_loss < progress["best_loss"]
        if acc.is_main_process:  # one writer; the others wait for the checkpoint (and keep the same progress)
            _checkpoint(ckpt, acc.unwrap_model(model), opt, sched, progress, best=best)
        else:
            _note_epoch(progress, best=best)
        acc.wait_for_everyone()
        if task is not None:
            bar.update(task, advance=1, info=f"loss {train_loss:.3f}  dev loss {dev_loss:.3f}")
    model = acc.unwrap_model(model)
    aux.close()
    model.load_state_dict(load_tensors(ckpt / "best.safetensors"), strict=False)
    return {"best_epoch": progress["best_epoch"], "dev_loss": progress["best_loss"], "train_seconds": progress["seconds"],
            "history": progress["history"]}  # fmt: skip


def next_token_loss(model, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """``fit``'s default loss: next-token cross-entropy on the completion tokens. With ``chunk`` > 0
    (None: ``lm.loss_chunk``'s default) it is fused where the model allows (``stages.losses.fused``):
    the output layer projects only completion positions, ``chunk`` at a time; the same value."""
    from stages.config import LMConfig
    from stages.losses.fused import final_hidden, fused_ce, output_layer

    chunk = LMConfig.loss_chunk if chunk is None else chunk
    layer = output_layer(model) if chunk > 0 else None
    if layer is None:
        return token_ce(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    hidden, head = final_hidden(model, layer, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    target = batch["labels"][:, 1:]
    return fused_ce(hidden[:, :-1], head, target != IGNORE, target, chunk=chunk)


def _accelerator(cfg: DistillConfig, device: torch.device):
    """accelerate on ``device``: bf16 mixed precision on GPU (``lm.precision: auto``) or when
    asked, gradient accumulation over ``grad_accum`` batches."""
    from accelerate import Accelerator

    precision = cfg.lm.precision
    if precision not in ("auto", "fp32", "bf16"):
        raise DistilError(f"lm.precision must be auto, fp32 or bf16, got '{precision}'")
    mixed = "bf16" if (precision == "bf16" or (precision == "auto" and device.type == "cuda")) else "no"
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum)


def _schedule(opt, rows: int, cfg: DistillConfig):
    """(epochs, learning-rate schedule): ``steps`` > 0 fixes the optimiser steps whatever the
    data size (rounded to whole epochs), else ``epochs``; linear warm-up over the first 5% of
    the steps, then linear decay to zero."""
    per_epoch = -(-rows // (cfg.batch_size * cfg.grad_accum))
    epochs = max(1, round(cfg.steps / per_epoch)) if cfg.steps > 0 else cfg.epochs
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * max(0.0, 1 - s / max(steps, 1))
    )
    return epochs, sched


def _resume(ckpt: Path, model, opt, sched) -> dict[str, Any]:
    """The training progress so far: a fresh one, or the checkpoint's (which also restores the
    model, optimiser, schedule and torch RNG, so a resumed run continues exactly)."""
    progress = {"epoch": 0, "best_loss": float("inf"), "best_epoch": -1, "history": [], "seconds": 0.0}
    saved = restore(ckpt, model, opt, sched)
    if saved is not None:
        progress = saved["progress"]
        torch.set_rng_state(saved["rng"])
    return progress


def _train_epoch(model, rows, loss_fn, aux: RouterAuxLoss, acc, opt, sched, cfg: DistillConfig, pad_id: int) -> float:
    """One pass over ``rows``; the mean training loss of its batches. With several processes
    each takes every ``world``-th row of a global batch of ``batch_size`` rows (DDP averages
    the gradients); a last batch smaller than the number of processes is dropped."""
    model.train()
    total, count, rank, world = 0.0, 0, acc.process_index, acc.num_processes
    for chunk in batches(rows, cfg.batch_size):
        if world > 1:
            if len(chunk) < world:
                continue
            chunk = chunk[rank::world]
        batch = {k: v.to(acc.device) for k, v in collate(chunk, pad_id).items()}
        with acc.accumulate(model):
            loss = aux.add_to(loss_fn(model, batch))
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            if acc.sync_gradients:
                sched.step()
            opt.zero_grad(set_to_none=True)
        total += float(loss.detach())
        count += 1
    mean = total / max(count, 1)
    return float(acc.reduce(torch.tensor(mean, device=acc.device), "mean")) if world > 1 else mean


def _end_epoch(progress: dict, epoch: int, train_loss: float, dev_loss: float, live) -> None:
    """The epoch's losses into the history (and dvclive when logging)."""
    progress["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "dev_loss": dev_loss})
    if live is not None:
        live.log_metric("train_loss", train_loss)
        live.log_metric("dev_loss", dev_loss)
        live.next_step()


def _note_epoch(progress: dict, *, best: bool) -> None:
    """The epoch done (and the best one) in ``progress``."""
    row = progress["history"][-1]
    if best:
        progress.update(best_loss=row["dev_loss"], best_epoch=row["epoch"])
    progress["epoch"] = row["epoch"]


def _checkpoint(ckpt: Path, model, opt, sched, progress: dict, *, best: bool) -> None:
    """Save the epoch: its weights as the selected ones when ``best``, then the whole state
    (safetensors + JSON) that a killed run resumes from."""
    _note_epoch(progress, best=best)
    if best:
        save_tensors(ckpt / "best.safetensors", model.state_dict())
    save_state(ckpt / "state", {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "progress": progress, "rng": torch.get_rng_state(),
    })  # fmt: skip


@torch.no_grad()
@torch.no_grad()
def evaluate_loss(model, rows: RowSource, batch_size: int, pad_id: int, device, chunk: int | None = None) -> float:
    """Next-token CE per completion token over ``rows`` (``next_token_loss``: fused with ``chunk`` > 0,
    so the dev pass never holds [tokens, V] logits either)."""
    model.eval()
    total, tokens = 0.0, 0
    for part in batches(rows.epoch(), batch_size):
        b = {k: v.to(device) for k, v in collate([r[:2] for r in part], pad_id).items()}
        n = int((b["labels"][:, 1:] != IGNORE).sum())
        total += float(next_token_loss(model, b, chunk=chunk)) * n
        tokens += n
    return total / max(tokens, 1)
