"""How closely a student behaves like its teacher on held-out prompts (``distil evaluate
--teacher``): the teacher answers each prompt greedily, then every model reads the
teacher's prompt and answer (teacher forcing) and is compared with the teacher position by
position over the answer's tokens.

- ``kl_to_teacher``: the mean per-token KL(p_teacher || p_model) over the full vocabulary
  (nats), the quantity word-level KD minimises (Kim & Rush 2016, eq. 4); ``kl_to_teacher_p90``
  its 90th percentile over tokens.
- ``top1_agreement``: the share of those positions where the model's most likely next token
  is the teacher's greedy token.
- ``greedy_match``: the share of prompts whose greedy completion (each model decoding on its
  own) is the teacher's, character for character after stripping whitespace.
- ``speedup``: the teacher's time to generate over the model's, both decoding the same
  prompts (the first ``SPEED_PROMPTS``) for exactly the same number of new tokens; timed
  interleaved, teacher and models in turn, ``SPEED_ROUNDS`` times, the median ratio reported
  with its range (``speedup_min``, ``speedup_max``), so a slow moment of the machine falls on
  both sides of a ratio.

The logits are kept at answer positions only (left padding, ``logits_to_keep``) and batch by
batch, so no [prompts, tokens, vocabulary] tensor is ever held. Models on another tokenizer
than the teacher's get none of the token-level keys (their tokens are not comparable).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stages.lm.models import load_lm

BATCH = 8
"""Sequences per teacher-forced forward pass."""
SPEED_PROMPTS, SPEED_ROUNDS = 16, 3


def same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _batch(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad: int):
    """Left-padded (ids, attention mask, position ids) of prompt + answer, and how many
    final positions hold the answer's predictions (the last prompt token predicts the first)."""
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions, max(len(a) for a in answers) + 1


@torch.no_grad()
def _answer_logprobs(model, ids, mask, positions, keep: int, answers, device) -> torch.Tensor:
    """[answer tokens of the batch, V] float32 log-probs at the positions that predict each
    answer token, rows concatenated in order."""
    try:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), logits_to_keep=keep)
    except TypeError:  # a model class without logits_to_keep
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    logits = out.logits[:, -keep:-1]  # position -keep+j predicts answer token j (the last position predicts past the end)
    rows = [logits[i, keep - 1 - len(a) :] for i, a in enumerate(answers)]
    return torch.log_softmax(torch.cat(rows).float(), dim=-1)


def likeness(teacher: str, reference: list[dict], models: dict[str, str], device) -> dict[str, dict]:
    """Per model name: ``kl_to_teacher``, ``kl_to_teacher_p90`` and ``top1_agreement`` against
    ``teacher`` on its greedy ``reference`` (one dict per prompt: the ``prompt`` text it read and
    the ``token_ids`` it answered), for the models in ``models`` (name -> path) that share the
    teacher's vocabulary."""
    t_model, t_tok = load_lm(teacher, device)
    every = {name: (t_model, t_tok) if str(path) == str(teacher) else load_lm(path, device) for name, path in models.items()}
    loaded = {name: model for name, (model, tok) in every.items() if same_vocabulary(tok, t_tok)}
    pairs = [(t_tok(r["prompt"], add_special_tokens=False)["input_ids"], r["token_ids"]) for r in reference if r["token_ids"]]
    kls: dict[str, list[np.ndarray]] = {n: [] for n in loaded}
    hits: dict[str, list[np.ndarray]] = {n: [] for n in loaded}
    pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    for i in range(0, len(pairs), BATCH):
        prompts, answers = zip(*pairs[i : i + BATCH], strict=True)
        ids, mask, positions, keep = _batch(prompts, answers, pad)
        t_logp = _answer_logprobs(t_model, ids, mask, positions, keep, answers, device)
        target = torch.tensor([t for a in answers for t in a], device=t_logp.device)
        for name, model in loaded.items():
            s_logp = t_logp if model is t_model else _answer_logprobs(model, ids, mask, positions, keep, answers, device)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).clamp_min(0)
            kls[name].append(kl.cpu().numpy())
            hits[name].append((s_logp.argmax(-1) == target).cpu().numpy())
    out = _speedups(t_model, t_tok, every, [r["prompt"] for r in reference], reference, device)
    for name in loaded:
        kl = np.concatenate(kls[name]) if kls[name] else np.zeros(0)
        hit = np.concatenate(hits[name]) if hits[name] else np.zeros(0)
        out[name].update({
            "kl_to_teacher": float(kl.mean()) if kl.size else float("nan"),
            "kl_to_teacher_p90": float(np.quantile(kl, 0.9)) if kl.size else float("nan"),
            "top1_agreement": float(hit.mean()) if hit.size else float("nan"),
        })  # fmt: skip
    return out


@torch.no_grad()
def _seconds(model, tok, prompts: list[str], new_tokens: int, device) -> float:
    """Seconds to decode ``new_tokens`` greedy tokens (no earlier stop) after each prompt."""
    import time

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    start = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _speedups(t_model, t_tok, every: dict, prompts: list[str], reference: list[dict], device) -> dict[str, dict]:
    """``speedup`` (median over rounds of teacher seconds / model seconds), ``speedup_min``,
    ``speedup_max`` per model, timed interleaved (module docstring)."""
    prompts = prompts[:SPEED_PROMPTS]
    new = max(1, max((len(r["token_ids"]) for r in reference[:SPEED_PROMPTS]), default=1))
    _seconds(t_model, t_tok, prompts[:1], 2, device)  # warm-up: one-off costs of the first generate call
    ratios: dict[str, list[float]] = {name: [] for name in every}
    for _ in range(SPEED_ROUNDS):
        for name, (model, tok) in every.items():
            if model is t_model:
                ratios[name].append(1.0)
                continue
            teacher = _seconds(t_model, t_tok, prompts, new, device)
            ratios[name].append(teacher / max(_seconds(model, tok, prompts, new, device), 1e-9))
    return {name: {"speedup": float(np.median(r)), "speedup_min": float(min(r)), "speedup_max": float(max(r))}
            for name, r in ratios.items()}  # fmt: skip


def greedy_match(completions: Sequence[str], reference: Sequence[str]) -> float:
    """Share of prompts whose greedy completion equals the teacher's (whitespace stripped)."""
    return float(np.mean([a.strip() == b.strip() for a, b in zip(completions, reference, strict=True)]))
