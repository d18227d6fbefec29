"""A lean KV-cache sampling loop for completions sampled inside a training step (on-policy,
reward-aware and self-distilling methods sample the student at every batch).

``transformers``' ``generate`` spends about as long per new token in its own bookkeeping
(logits processors, stopping criteria, cache set-up) as a small student spends in its
forward; this loop does only what such sampling needs: one prefill that keeps the last
position's logits only (``logits_to_keep``: no [prompt, V] logits), then one forward per new
token on the model's own cache, a Gumbel-max draw from the full tempered distribution, rows
padded once they have emitted eos, and a stop when every row has. The cache is whatever the
model's forward makes (its sliding-window or hybrid cache included); the keyword names
(``cache`` / ``past_key_values``, ``logits_to_keep`` / ``num_logits_to_keep``) are read from the
model's signature, so transformers 4.45 to 5 all work.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _keywords(cls: type) -> tuple[str, str | None, bool]:
    """(cache keyword, logits-to-keep keyword or None, takes position_ids) of a model class's forward."""
    params = inspect.signature(cls.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep, "position_ids" in params


def _inner(model):
    """The transformers model under a DDP / accelerate wrapper and a peft adapter."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_of(out):
    for key in ("cache", "past_key_values"):
        if out.get(key) is not None:
            return out.get(key)
    raise ValueError("the model's forward returned no KV cache with use_cache=True; it cannot be sampled incrementally")


def gumbel_max(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] drawn from softmax(logits / temperature): the argmax of
    logits / T + Gumbel noise (exact in law; Gumbel 1954, the "Gumbel-max trick"). On CPU it is a
    fourth of ``torch.multinomial``'s time (whose exponential draws dominate it) at a few tokens' batch."""
    noise = torch.rand(logits.shape, device=logits.device).log_().neg_().log_()  # -G: log(-log U)
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return (scaled - noise).argmax(-1)


@torch.no_grad()
def sample_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                  pad_token_id: int, eos_token_id: int | None, temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """New tokens [B, <= max_new_tokens] sampled after left-padded ``input_ids`` [B, T] (``attention_mask``
    0 on the padding) at ``temperature`` from the full distribution; after a row's eos, ``pad_token_id``.
    The call runs in the model's current mode (the caller sets eval)."""
    cache_kw, keep_kw, positions = _keywords(type(_inner(model)))
    mask = attention_mask.long()
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    kwargs = {"use_cache": True, **({keep_kw: 1} if keep_kw else {}), **({"position_ids": pos} if positions else {})}
    out = model(input_ids=input_ids, attention_mask=mask, **kwargs)
    rows = input_ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    last, new = pos[:, -1:], []
    for i in range(max_new_tokens):
        token = gumbel_max(out.logits[:, -1], temperature).masked_fill_(done, pad_token_id)
        new.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        last = last + 1
        step = {cache_kw: _cache_of(out), "use_cache": True, **({"position_ids": last} if positions else {})}
        out = model(input_ids=token[:, None], attention_mask=mask, **step)
    return torch.stack(new, dim=1) if new else input_ids.new_zeros(rows, 0)
