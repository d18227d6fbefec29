"""Generation for every LM command that decodes: teacher data, ``select --by uncertain``,
evaluation, cascades and on-policy distillation all sample through this module.

``generate`` gives greedy text completions; ``sample`` gives n completions per prompt with
per-token top-k log-probs of the untempered distribution (and, for MoE models, the routing
of every generated token); ``sample_continuations`` samples completions of prompts that are
already token ids (on-policy distillation's student samples inside a training batch).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from stages.lm.decode import sample_tokens
from stages.lm.moe.routing import RouterRecorder


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, device, decode=None) -> list[str]:
    """Greedy completions (left-padded batches, KV cache), decoded without the prompt.
    ``decode(model, attention_mask)``, when given, makes the logits processors of each
    batch (``stages.lm.moe.scmoe.SCMoE``: greedy SCMoE)."""
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             logits_processor=decode(model, enc["attention_mask"]) if decode is not None else None)  # fmt: skip
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, samples: int, temperature: float, top_p: float, max_new_tokens: int,
           top_k: int, device, decode=None, routing: bool = False, prompt_routing: bool = False) -> list[dict]:  # fmt: skip
    """``samples`` completions per prompt (temperature 0: greedy) with, per generated token,
    the top-k log-probs of the untempered distribution; prompt-major order. ``decode(model,
    attention_mask)``, when given, makes logits processors that rescore each step before
    temperature and top-p (``stages.lm.moe.scmoe.SCMoE``); the stored log-probs stay the model's own.

    ``routing`` (MoE models): each row also gets ``expert_ids`` (flat list, token-major then
    layer then rank, ``n_tokens * layers * k`` values) and ``expert_weights`` (float16) of
    the input position that predicted each generated token (``stages.lm.moe.routing``); with
    ``prompt_routing`` also ``prompt_expert_ids`` / ``prompt_expert_weights`` for the prompt
    positions before (padding dropped), so prompt part + generated part cover every input
    position in order. Without ``routing`` nothing is hooked."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    greedy = temperature <= 0
    with RouterRecorder(model) if routing else contextlib.nullcontext() as recorder:
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=None if greedy else temperature,
            top_p=None if greedy else top_p, num_return_sequences=samples, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            logits_processor=decode(model, enc["attention_mask"]) if decode is not None else None,
        )  # fmt: skip
    gen = out.sequences[:, enc["input_ids"].shape[1] :]
    # raw (untempered) logits per step; reduced step by step to the chosen token's log-prob
    # and the top-k, so no [batch, steps, vocab] tensor is ever built on top of them
    k = min(top_k, out.logits[0].shape[-1])
    chosen, top_ids, top_lp = [], [], []
    for t, step in enumerate(out.logits):
        lp = torch.log_softmax(step.float(), dim=-1)
        chosen.append(lp.gather(-1, gen[:, t : t + 1]).squeeze(-1))
        if k:
            v, i = lp.topk(k, dim=-1)
            top_ids.append(i)
            top_lp.append(v)
    chosen = torch.stack(chosen, dim=1)
    top = (torch.stack(top_ids, 1), torch.stack(top_lp, 1)) if k else None
    rows = []
    for i in range(gen.shape[0]):
        ids = gen[i].tolist()
        n = _length(ids, tokenizer.eos_token_id)
        rows.append({
            "token_ids": ids[:n],
            "seq_logprob": float(chosen[i, :n].sum()),
            "topk_ids": top[0][i, :n].flatten().int().tolist() if top is not None else [],
            "topk_logprobs": top[1][i, :n].flatten().cpu().numpy().astype(np.float32) if top is not None else np.zeros(0, np.float32),
            "completion": tokenizer.decode(ids[:n], skip_special_tokens=True),
        })  # fmt: skip
    if routing:
        _attach_routing(rows, recorder, enc["attention_mask"], samples, prompt_routing)
    return rows


def _attach_routing(rows: list[dict], recorder, attention_mask: torch.Tensor, samples: int, prompt_routing: bool) -> None:
    """Per row, the recorded routing of its generated tokens (and prompt) as flat arrays.
    ``generate`` repeats each prompt ``samples`` times in place (row r is prompt r // samples),
    which is the order the routers saw."""
    p_ids, p_w, g_ids, g_w = recorder.generation()
    lengths = attention_mask.sum(-1).repeat_interleave(samples).tolist()
    for i, row in enumerate(rows):
        n = len(row["token_ids"])
        if g_ids.shape[1] < n:
            raise RuntimeError(f"routing recorded {g_ids.shape[1]} decoding steps for {n} generated tokens")
        row["expert_ids"] = g_ids[i, :n].reshape(-1).tolist()
        row["expert_weights"] = g_w[i, :n].reshape(-1).astype(np.float16)
        if prompt_routing:
            start = p_ids.shape[1] + 1 - int(lengths[i])  # left padding: a prompt's real positions come last
            row["prompt_expert_ids"] = p_ids[i, start:].reshape(-1).tolist()
            row["prompt_expert_weights"] = p_w[i, start:].reshape(-1).astype(np.float16)


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, max_len: int,
                         device, temperature: float = 1.0) -> list[list[int]]:  # fmt: skip
    """One completion per prompt of token ids, sampled at ``temperature`` from the model's full
    distribution (no top-k / top-p cut: a student's own samples, as on-policy distillation needs)
    by ``stages.lm.decode.sample_tokens``, and cut after eos: at most ``max_new_tokens`` and no
    further than ``max_len`` in all (at least one token).
    The model is put in eval mode for the call and handed back in the mode it came in."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    left = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attn = (
        torch.arange(width, device=device)[None, :] >= torch.tensor([width - len(p) for p in prompts], device=device)[:, None]
    ).long()
    was = model.training
    model.eval()
    try:
        gen = sample_tokens(model, left, attn, max_new_tokens=max(1, min(max_new_tokens, max_len - width)), pad_token_id=pad,
                            eos_token_id=tokenizer.eos_token_id, temperature=temperature)  # fmt: skip
    finally:
        model.train(was)
    return [g[: _length(g, tokenizer.eos_token_id)] for g in gen.tolist()]


def _length(ids: list[int], eos: int) -> int:
    """Tokens up to and including the first eos (all of them without one)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)
