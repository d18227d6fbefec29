"""Fused, chunked student-side LM losses: next-token CE and the token-level divergences of
``stages.losses.logits`` computed from the student's final hidden states and its output layer,
a chunk of token positions at a time, so the student's [tokens, V] logits never exist whole.

The idea is Liger-Kernel's fused linear cross-entropy (Hsu et al., "Liger Kernel: Efficient
Triton Kernels for LLM Training", 2024) and the chunked distillation losses built on it: for a
small-hidden, large-vocabulary model the output projection is the largest activation, so it is
made inside the loss, only at the positions the loss reads (prompt positions never get logits),
one chunk at a time; each chunk's gradients are taken while its logits exist, so nothing of the
chunk is kept for the backward pass, which only scales them (``_Chunked``). Liger writes the
gradient of CE by hand in a kernel; here autograd differentiates the chunk's loss through the same
functions of ``stages.losses.logits`` down to the log-softmax (whose gradient is taken in place, so
a chunk holds two [chunk, V] tensors at most), and every divergence fuses without a formula of its own.

Per chunk: logits = h W^T (+ b) under the autocast the model's own forward ran with (bf16 on GPU),
one log-softmax in float32 (float64 stays float64), CE on the targets, and the sparse divergence on
the k stored ids plus the "other" bucket built from that same log-softmax. A chunk returns sums;
the normalisers are global (CE: weighted completion tokens, as ``token_ce``; divergence: mask x
weight, as ``reduce``), so the result equals the unfused loss in value and gradient.

``output_layer`` and ``final_hidden`` get the hidden states and the output layer from the causal
LMs distil trains (transformers models, PEFT-wrapped LoRA students, DDP-wrapped ones): the model's
whole forward runs (so DDP's, PEFT's and accelerate's wrappers and the MoE router's aux-loss hook
all see it), and a forward pre-hook on the output layer takes the hidden states it is handed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from stages.errors import DistilError
from stages.losses.logits import _log1mexp, _wide, jsd

PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})
"""Model types whose logits are exactly ``lm_head(hidden)``. Others may scale or soft-cap the logits
after the head (gemma's soft-capping, cohere's ``logit_scale``, granite's ``logits_scaling``), which
a projection of the hidden states would miss: they keep the unfused path."""

Select = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``select(s_logp [n, V], s_top [n, k], t_logprobs [n, k]) -> (kept [n] bool, extra)``: a token
selection inside a chunk (TSD-KD's) and a term added to the divergence (already normalised)."""


@dataclass(frozen=True)
class Head:
    """An output layer as the model ran it: ``weight`` [V, H], ``bias`` [V] or None, and the
    autocast dtype of the forward that called it (None: none), so a chunk is projected the same way."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    autocast: torch.dtype | None = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [n, H] -> logits [n, V]."""
        if self.autocast is None:
            return F.linear(h, self.weight, self.bias)
        with torch.autocast(h.device.type, dtype=self.autocast):
            return F.linear(h, self.weight, self.bias)

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ b`` in the precision the projection ran in (its gradients' products); added to
        ``out`` in place when given (one GEMM when the dtypes agree)."""
        if self.autocast is None and (out is None or out.dtype == a.dtype == b.dtype):
            return a @ b if out is None else out.addmm_(a, b)
        with torch.autocast(a.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            product = a @ b
        return product if out is None else out.add_(product)


def output_layer(model) -> torch.nn.Linear | None:
    """The output layer (``get_output_embeddings()``) of a causal LM the fused losses can stand in
    for, through DDP / DataParallel and PEFT wrappers; None when they cannot (a model type not in
    ``PLAIN_HEAD``, a head that is not a plain ``nn.Linear`` such as a LoRA-adapted or quantised
    one, or sharded weights): the caller then keeps the unfused path."""
    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    config, get = getattr(inner, "config", None), getattr(inner, "get_output_embeddings", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD or get is None:
        return None
    head = get()
    if type(head) is not torch.nn.Linear or type(head.weight.data) is not torch.Tensor:
        return None
    return head


def final_hidden(model, layer: torch.nn.Linear, **inputs) -> tuple[torch.Tensor, Head]:
    """Run ``model(**inputs)`` and return the hidden states [B, T, H] its output layer ``layer``
    received, with that layer as a ``Head``. The pre-hook hands the layer only the last position,
    so the model's own projection costs [B, 1, V]; its outputs are dropped (an MoE model's router
    aux loss still reaches ``RouterAuxLoss``, which hooks the forward itself)."""
    seen: list[tuple[torch.Tensor, torch.dtype | None]] = []

    def take(module, args):
        if not args:
            return None
        h, device = args[0], args[0].device.type
        seen.append((h, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None))
        return (h[..., -1:, :], *args[1:])

    handle = layer.register_forward_pre_hook(take)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise DistilError(f"{type(model).__name__} called its output layer {len(seen)} times in one forward (with its hidden "
                          "states as the first argument); the fused loss needs exactly one: set lm.loss_chunk=0")  # fmt: skip
    hidden, autocast = seen[0]
    return hidden, Head(layer.weight, layer.bias, autocast)


def fused_ce(hidden, head: Head, keep, targets, weight=None, *, chunk: int) -> torch.Tensor:
    """Next-token CE of ``stages.lm.training.token_ce`` from hidden states.

    ``hidden`` [B, T, H] at the positions that predict (``hidden[:, :-1]`` of a sequence), ``keep``
    [B, T] bool (the completion positions), ``targets`` [B, T] the tokens they predict, ``weight``
    [B, T] or None; the weighted mean of -log p_s(target) over kept positions."""
    return fused_top_k(hidden, head, keep, targets, None, None, hyper={}, weight=weight, alpha=0.0, chunk=chunk)


def fused_token_logprobs(hidden, head: Head, keep, targets, *, chunk: int) -> torch.Tensor:
    """log p_s(target) [N] at the ``keep`` positions (in ``keep`` order) from hidden states ``hidden``
    [B, T, H] and ``targets`` [B, T]: the reward-aware methods' per-token log-probs of sampled
    tokens. Each chunk's [chunk, V] logits are recomputed in the backward pass (activation
    checkpointing of the chunk), so they never exist whole and are not kept for it."""
    from torch.utils.checkpoint import checkpoint

    h, t = hidden[keep], targets[keep]
    parts = [checkpoint(_chosen_logprobs, h[s : s + chunk], t[s : s + chunk], head, use_reentrant=False)
             for s in range(0, len(h), max(chunk, 1))]  # fmt: skip
    return torch.cat(parts) if parts else h.new_zeros(0)


def _chosen_logprobs(h: torch.Tensor, t: torch.Tensor, head: Head) -> torch.Tensor:
    z = _wide(head.logits(h))
    return z.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def fused_top_k(hidden, head: Head, keep, targets, teacher, divergence, *, hyper: dict, weight=None, alpha: float,
                chunk: int, select: Select | None = None) -> torch.Tensor:  # fmt: skip
    """``alpha`` x ``divergence`` against the sparse top-k ``teacher`` + (1 - alpha) x CE on
    ``targets`` (CE skipped at alpha >= 1, the divergence at alpha <= 0), from hidden states.

    ``hidden`` [B, T, H], ``keep`` [B, T] bool, ``targets`` [B, T] (None with alpha >= 1),
    ``teacher`` (ids [B, T, k], log-probs [B, T, k]) aligned with ``hidden``, ``weight`` [B, T] or
    None; ``divergence`` a function of ``stages.losses.DIVERGENCES`` with its ``hyper`` keywords;
    ``select`` a per-chunk token selection (``Select``) whose kept tokens the divergence averages
    over and whose extra term is added to it. Equals ``alpha * divergence(logits, teacher,
    mask=keep, weight=weight) + (1 - alpha) * token_ce`` on the full logits."""
    w = torch.ones(keep.shape, device=keep.device) if weight is None else weight
    with_div, with_ce = teacher is not None and alpha > 0, alpha < 1
    t_ids, t_lp = (teacher[0][keep], teacher[1][keep]) if with_div else (None, None)
    rows = (targets[keep] if with_ce else None, w[keep], t_ids, t_lp)
    a_div, a_ce = (alpha, 1 - alpha) if with_div and with_ce else (float(with_div), float(with_ce))

    def coefficients(div_w, dtype):  # d loss / d [CE sum, divergence sum, divergence weight, extra]: linear in the sums
        ce_w, div_w = rows[1].to(dtype).sum().clamp_min(1e-12), div_w.to(dtype).clamp_min(1e-12)
        return torch.stack([a_ce / ce_w, a_div / div_w, ce_w * 0, ce_w * 0 + a_div])

    fn = partial(_sparse_sums, divergence=divergence if with_div else None, hyper=hyper, ce=with_ce, select=select)
    # without a selection the divergence's weight is every kept token's; with one it is known after a first sweep
    known = lambda: rows[1].sum() if select is None else None  # noqa: E731
    return _sweep(hidden[keep], head, rows, fn, coefficients, known, chunk, log_probs=True)


def fused_dense(hidden, head: Head, keep, teacher, divergence, *, hyper: dict, weight=None, chunk: int) -> torch.Tensor:
    """``divergence`` against a full-vocabulary teacher (on-policy's in-process teacher) from hidden
    states: ``hidden`` [B, T, H], ``keep`` [B, T] bool, ``weight`` [B, T] or None, and the teacher
    at the kept positions only, in ``keep`` order: logits [N, V], or a pair (teacher hidden states
    [N, H_t], its ``Head``) projected a chunk at a time without gradient, so neither side's
    [N, V] logits exist whole. Equals ``divergence(logits, teacher_logits, mask=keep, weight=weight)``."""
    w = torch.ones(keep.shape, device=keep.device) if weight is None else weight
    t_rows, t_head = (teacher[0], teacher[1]) if isinstance(teacher, tuple) else (teacher, None)
    rows = (w[keep], t_rows)
    fn = partial(_dense_sums, teacher_head=t_head, divergence=divergence, hyper=hyper)
    closed = partial(_dense_jsd, teacher_head=t_head, **hyper) if divergence is jsd else None
    coefficients = lambda div_w, dtype: torch.stack([1 / div_w.to(dtype).clamp_min(1e-12), div_w.to(dtype) * 0])  # noqa: E731
    return _sweep(hidden[keep], head, rows, fn, coefficients, lambda: rows[0].sum(), chunk, log_probs=False, closed=closed)


def _sweep(h, head: Head, rows: tuple, fn, coefficients, known, chunk: int, *, log_probs: bool, closed=None) -> torch.Tensor:
    """``coefficients(div_w) . sum over chunks of fn(x, *rows of the chunk)``, x the chunk's
    log-softmax in float32 (``log_probs``) or its logits, with the gradients of ``h``, ``head.weight``
    and ``head.bias`` computed chunk by chunk on the way (``_Chunked``). ``known()`` is the
    divergence's total weight (the sums' index 2 for the sparse ``fn``, 1 for the dense one), or
    None when it depends on the logits: then a first sweep without gradients finds it. ``closed(x, *rows,
    coef=...)``, when given, returns a chunk's sums and their gradient with respect to x in closed form
    (``_dense_jsd``), in place of autograd through ``fn``."""
    if chunk < 1:
        raise DistilError(f"lm.loss_chunk must be a positive number of token positions for the fused loss, got {chunk}")
    if h.shape[0] == 0:
        return h.sum()  # nothing to learn from: zero, still part of the graph
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, head.weight, head.bias))
    return _Chunked.apply(h, head.weight, head.bias, (head, rows, fn, coefficients, known, chunk, grad, log_probs, closed))


class _Chunked(torch.autograd.Function):
    """The loss of ``_sweep`` with its gradients computed in the forward, a chunk at a time
    (Liger-Kernel's fused linear cross-entropy does the same): per chunk the logits are made, the
    chunk's loss is differentiated with respect to them by autograd through the same functions,
    and the two products with the output layer give the chunk's share of the hidden states' and the
    weight's gradient; the logits are freed before the next chunk. The backward only scales them
    (in place: they are used once)."""

    @staticmethod
    def forward(ctx, h, weight, bias, spec):
        head, rows, fn, coefficients, known, chunk, grad, log_probs, closed = spec
        div_w = known()
        if div_w is None:
            div_w = _chunks(h, head, rows, fn, chunk, None, log_probs)[0][2]
        coef = coefficients(div_w, torch.promote_types(torch.promote_types(h.dtype, weight.dtype), torch.float32))
        totals, ctx.grads = _chunks(h, head, rows, fn, chunk, coef if grad else None, log_probs, closed)
        return (coef.to(totals.dtype) * totals).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("the fused loss was differentiated twice; its gradients are computed once, in the forward")
        grads, ctx.grads = ctx.grads, None
        return (*(None if x is None else x.mul_(g.to(x.dtype)) for x in grads), None)


def _chunks(h, head: Head, rows: tuple, fn, chunk: int, coef, log_probs: bool, closed=None) -> tuple[torch.Tensor, tuple]:
    """(the sum over chunks of ``fn``'s vector of sums, the gradients of ``coef . sums`` with
    respect to (h, head.weight, head.bias): None each without ``coef`` or when not needed)."""
    weight, bias, total = head.weight, head.bias, None
    want = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad) if coef is not None else (False,) * 3
    dh = torch.zeros_like(h) if want[0] else None
    wide = torch.promote_types(weight.dtype, torch.float32)  # half-precision weights add up their chunks' gradients in float32
    dw = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want[1] else None
    db = torch.zeros(bias.shape, dtype=wide, device=bias.device) if want[2] else None
    for s in range(0, h.shape[0], chunk):
        hc, part = h[s : s + chunk].detach(), tuple(None if r is None else r[s : s + chunk] for r in rows)
        sums, dz = _chunk(hc, head, part, fn, coef, log_probs, closed)
        total = sums if total is None else total + sums
        if dh is not None:
            dh[s : s + chunk] = head.matmul(dz, weight).to(dh.dtype)
        if dw is not None:
            head.matmul(dz.T, hc, out=dw)
        if db is not None:
            db += dz.sum(0)
        del dz  # this chunk's [chunk, V] gradient goes before the next chunk makes its logits
    grads = (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
    return total, grads


def _chunk(hc, head: Head, part: tuple, fn, coef, log_probs: bool, closed=None):
    """(``fn``'s sums for one chunk, the gradient of ``coef . sums`` with respect to its logits or None)."""
    with torch.no_grad():
        x = head.logits(hc)
        dtype = x.dtype
        if closed is not None:
            return closed(x, *part, coef=coef)
        if log_probs:  # the logits go at once: a chunk holds its log-probs and, later, their gradient
            x = F.log_softmax(_wide(x), dim=-1)
        if coef is None:
            return fn(x, *part), None
    with torch.enable_grad():
        x.requires_grad_()
        sums = fn(x, *part)
        (dz,) = torch.autograd.grad((coef.to(sums.dtype) * sums).sum(), x)
    if log_probs:  # through the log-softmax, in place: g - softmax(z) * sum(g)
        dz = dz.sub_(x.detach().exp_().mul_(dz.sum(-1, keepdim=True))).to(dtype)
    return sums.detach(), dz


def _sparse_sums(s_logp, target, w, t_ids, t_lp, *, divergence, hyper: dict, ce: bool, select: Select | None):
    """[CE sum, divergence sum, divergence weight, extra] of one chunk from its log-softmax [n, V]."""
    w = w.to(s_logp.dtype)
    zero = s_logp.new_zeros(())
    if divergence is None:
        return torch.stack([-(s_logp.gather(-1, target[:, None]).squeeze(-1) * w).sum(), zero, zero, zero])
    # one gather for the teacher's ids and the target: its backward is one scatter over [n, V], not two
    picked = s_logp.gather(-1, torch.cat([t_ids.long(), target[:, None]], -1) if ce else t_ids.long())
    s_top = picked[:, : t_ids.shape[-1]]
    ce_sum = -(picked[:, -1] * w).sum() if ce else zero
    kept, extra = (torch.ones_like(w, dtype=torch.bool), zero) if select is None else select(s_logp, s_top, t_lp)
    div_w = (kept.to(w.dtype) * w).sum()
    # The student on the k + 1 buckets (k ids and "other"), as log_prob_pair builds them; passed as
    # [n, k + 1] "logits" with ids 0..k-1, log_prob_pair's own log-softmax of it is the identity
    # and the divergence runs on the same buckets without a second pass over V.
    buckets = torch.cat([s_top, _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))], dim=-1)
    ids = torch.arange(t_ids.shape[-1], device=t_ids.device).expand_as(t_ids)
    div_sum = divergence(buckets, (ids, t_lp), mask=kept, weight=w, **hyper) * div_w.clamp_min(1e-12)
    return torch.stack([ce_sum, div_sum.to(zero.dtype), div_w, extra.to(zero.dtype)])


def _dense_sums(z, w, t_rows, *, teacher_head: Head | None, divergence, hyper: dict):
    """[divergence sum, divergence weight] of one chunk's logits against full teacher logits."""
    with torch.no_grad():
        t = t_rows if teacher_head is None else teacher_head.logits(t_rows)
    w = w.to(_wide(z).dtype)
    div_w = w.sum()
    div = divergence(z, t.to(z.device), mask=torch.ones_like(w, dtype=torch.bool), weight=w, **hyper)
    return torch.stack([(div * div_w.clamp_min(1e-12)).to(w.dtype), div_w])


def _xdiff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the last dim with 0 log 0 = 0 (a teacher's -inf logits)."""
    per = p * (log_p - log_q)
    return (per if torch.isfinite(log_p).all() else per.masked_fill(p == 0, 0.0)).sum(-1)


@torch.no_grad()
def _dense_jsd(z, w, t_rows, *, teacher_head: Head | None, beta: float, temperature: float = 1.0, coef=None):
    """``_dense_sums`` of ``jsd`` and, with ``coef``, the gradient of ``coef . sums`` with respect to the
    chunk's logits ``z`` [n, V], both in closed form: a handful of passes over [n, V] where autograd
    through the mixture's logsumexp and two KLs takes several times as many. With s, t the tempered
    log-softmaxes, lm = log(beta p_t + (1 - beta) p_s) and a = d per / d p_s (GKD, Agarwal et al. 2024,
    eq. 1; its limits beta = 0, 1 are forward and reverse KL, as ``jsd``):

        0 < beta < 1: per = beta sum p_t (t - lm) + (1 - beta) sum p_s (s - lm),  a = (1 - beta)(s - lm)
        beta <= 0:    per = sum p_t (t - s),  d per / d (z / T) = p_s - p_t
        beta >= 1:    per = sum p_s (s - t),  a = s - t

    and through the softmax d per / d (z / T) = p_s (a - sum p_s a); the sums are [T^2 sum w per, sum w],
    so d/dz = coef_0 T w d per / d (z / T). Equal to autograd through ``jsd`` (tests, float64)."""
    wide = _wide(z)
    t = t_rows if teacher_head is None else teacher_head.logits(t_rows)
    s = F.log_softmax(wide / temperature, dim=-1)
    t = F.log_softmax(_wide(t).to(s.dtype) / temperature, dim=-1)
    p_s, p_t = s.exp(), t.exp()
    w = w.to(s.dtype)
    if beta <= 0:
        per = _xdiff(p_t, t, s)
        g = p_s - p_t
    else:
        if beta >= 1:
            a = s - t
            per = (p_s * a).sum(-1)
        else:
            # log of the mixture from the probabilities (a third of logaddexp's time); clamped so that
            # a probability float underflows to 0 leaves lm finite (its terms then vanish with p)
            lm = (p_t * beta).add_(p_s, alpha=1 - beta).clamp_min_(torch.finfo(s.dtype).tiny).log_()
            a = s - lm
            per = beta * _xdiff(p_t, t, lm) + (1 - beta) * (p_s * a).sum(-1)
            a = a.mul_(1 - beta)
        g = p_s.mul_(a - (p_s * a).sum(-1, keepdim=True))
    sums = torch.stack([temperature**2 * (per * w).sum(), w.sum()])
    if coef is None:
        return sums, None
    return sums, g.mul_((coef[0].to(s.dtype) * temperature) * w[:, None]).to(z.dtype)
