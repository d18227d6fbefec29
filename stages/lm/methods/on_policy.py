"""The loss of ``distil distill --method on-policy``: generalised knowledge distillation
against one live teacher, on completions the student partly samples itself.

The teacher is a ``stages.lm.teachers.Teacher``. Run in process it gives its full
next-token distribution (``logits``) and the divergence is dense; behind a server it
scores the completions through ``Teacher.score`` and the divergence is the sparse top-k
one of ``stages.losses`` (the teacher's ``teacher.top_k`` most likely tokens plus one
"other" bucket), the form TRL's served-teacher trainers use.

With ``lm.loss_chunk`` > 0 the student's logits exist only at the completion positions the loss
reads, a chunk at a time (``stages.losses.fused``); so do an in-process teacher's, whose hidden
states are projected chunk by chunk beside the student's.
"""

from __future__ import annotations

import torch

from stages.config import DistillConfig
from stages.lm.generation import sample_continuations
from stages.lm.methods import LMMethod
from stages.lm.training import IGNORE, collate
from stages.losses import DIVERGENCES, divergence_hyper
from stages.losses.fused import final_hidden, fused_dense, fused_top_k, output_layer


def on_policy_loss(method: LMMethod, cfg: DistillConfig, teacher, tokenizer, max_len: int):
    """Generalised knowledge distillation (Agarwal et al., "On-Policy Distillation of
    Language Models", ICLR 2024, algorithm 1; the on-policy distillation survey): with
    probability ``lmbda`` a batch's completions are sampled from the student itself,
    otherwise they are the data's; the live teacher scores every completion token and the
    student minimises the method's divergence (``jsd`` with ``beta``) on those tokens. Training
    on its own samples is what keeps a student from exploiting a fixed teacher dataset
    ("On Teacher Hacking")."""
    divergence, hyper = DIVERGENCES[method.divergence], divergence_hyper(method.divergence, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)  # its own stream: the coin flips leave torch's global RNG alone
    dense = hasattr(teacher, "logits")

    def loss(m, b):
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        if torch.rand(1, generator=rng).item() < cfg.lmbda:
            ids, mask, labels = _student_samples(m, tokenizer, ids, labels, max_len, cfg.lm.max_new_tokens)
        keep = labels[:, 1:] != IGNORE
        weight = b["w"][:, None].expand_as(keep)
        layer = output_layer(m) if cfg.lm.loss_chunk > 0 else None
        if not dense:
            target = tuple(t[:, :-1] for t in scored_top_k(teacher, ids, labels, cfg.teacher.top_k))
        elif layer is None:
            target = teacher.logits(ids, mask).to(ids.device)[:, :-1]
        else:
            target = _dense_teacher(teacher, ids, mask, keep)
        if layer is None:
            logits = m(input_ids=ids, attention_mask=mask).logits
            return divergence(logits[:, :-1], target, mask=keep, weight=weight, **hyper)
        hidden, head = final_hidden(m, layer, input_ids=ids, attention_mask=mask)
        chunk = cfg.lm.loss_chunk
        if dense:
            return fused_dense(hidden[:, :-1], head, keep, target, divergence, hyper=hyper, weight=weight, chunk=chunk)
        return fused_top_k(
            hidden[:, :-1], head, keep, None, target, divergence, hyper=hyper, weight=weight, alpha=1.0, chunk=chunk
        )

    return loss


@torch.no_grad()
def _dense_teacher(teacher, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor):
    """An in-process teacher at the positions ``keep`` marks (in order), for ``fused_dense``: its
    hidden states [N, H_t] with its output layer when its model allows (the logits are then made a
    chunk at a time), else its logits [N, V] (``logits`` gives every position; the rest are dropped)."""
    model = getattr(teacher, "model", None)
    layer = output_layer(model) if isinstance(model, torch.nn.Module) else None
    if layer is None:
        return teacher.logits(ids, mask).to(ids.device)[:, :-1][keep]
    device = layer.weight.device
    hidden, head = final_hidden(model, layer, input_ids=ids.to(device), attention_mask=mask.to(device))
    return hidden[:, :-1][keep.to(device)], head


def scored_top_k(teacher, ids: torch.Tensor, labels: torch.Tensor, k: int,
                 prompts: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The teacher's top-k (ids [B, T, k], log-probs [B, T, k]) at every position that
    predicts a completion token (position t predicts token t + 1), from ``Teacher.score``
    of each row's prompt (or of ``prompts``, another context per row: a self-teacher's) and
    completion; log-prob -1e4 (nothing) elsewhere."""
    given, prompts, completions, starts = prompts, [], [], []
    for r, (row, lab) in enumerate(zip(ids.tolist(), labels.tolist(), strict=True)):
        first = next(i for i, v in enumerate(lab) if v != IGNORE)
        last = max(i for i, v in enumerate(lab) if v != IGNORE)
        prompts.append(row[:first] if given is None else given[r])
        completions.append(row[first : last + 1])
        starts.append(first - 1)
    scored = teacher.score(prompts, completions, k)
    width = min(s.topk_ids.shape[1] for s in scored) if scored else k
    t_ids = torch.zeros((*ids.shape, width), dtype=torch.long)
    t_lp = torch.full((*ids.shape, width), -1e4, dtype=torch.float32)
    for i, (s, start) in enumerate(zip(scored, starts, strict=True)):
        n = len(s.logprobs)
        t_ids[i, start : start + n] = torch.as_tensor(s.topk_ids[:, :width], dtype=torch.long)
        t_lp[i, start : start + n] = torch.as_tensor(s.topk_logprobs[:, :width], dtype=torch.float32)
    return t_ids.to(ids.device), t_lp.to(ids.device)


def _student_samples(model, tokenizer, ids, labels, max_len, max_new):
    """Replace each row's completion by one the student samples (temperature 1); the prompt
    stays and stays out of the loss."""
    prompts = []
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        prompts.append(row[: next(i for i, v in enumerate(lab) if v != IGNORE)])
    gen = sample_continuations(model, tokenizer, prompts, max_new_tokens=max_new, max_len=max_len, device=ids.device)
    batch = collate([(p + g, [IGNORE] * len(p) + g) for p, g in zip(prompts, gen, strict=True)], tokenizer.pad_token_id)
    return batch["input_ids"].to(ids.device), batch["attention_mask"].to(ids.device), batch["labels"].to(ids.device)
