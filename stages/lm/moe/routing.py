"""Recording an MoE model's routing: which experts each token went to, with what weight.

``RouterRecorder(model)`` hooks the router of every MoE layer (``stages.lm.models.routers``)
and keeps, per forward call of the model, each layer's top-k expert ids and router
weights. Used around ``model.generate`` it sees the prefill (the whole left-padded prompt
batch, ``[B, P]``) and then one call per decoding step (``[B, 1]``); ``generation()``
turns that into per-token arrays under one convention:

    the routing stored for token t is the routing of the input position whose output
    predicted token t

so generated token 0 carries the prefill's last position, generated token t >= 1 the
step-t input (generated token t-1), and prompt token j >= 1 the prompt position j-1.
Concatenating a row's prompt part and generated part gives the routing of every input
position of the sequence in order, which is what the routing metrics read.

Extra forward passes that must not be recorded (SCMoE's "weak" passes inside one
decoding step, a teacher scored alongside) run under ``recorder.paused()`` or, without a
handle on the recorder, ``paused(model)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.errors import DistilError
from stages.lm.models import routers

_ACTIVE: dict[int, RouterRecorder] = {}
"""id(model) -> its recorder while one is entered, so ``paused(model)`` finds it."""


def routing_shape(model) -> dict[str, int]:
    """``{layers, experts, experts_per_token}`` of an MoE model (what teacher-data manifests record)."""
    rs = routers(model)
    if not rs:
        raise DistilError(
            "router data requested from a model without a router (a dense model); "
            "use an MoE model (lm.family: mixtral, qwen2_moe or olmoe) or set routing=off"
        )
    return {"layers": len(rs), "experts": int(rs[0].num_experts), "experts_per_token": int(rs[0].top_k)}


@dataclass
class _Call:
    shape: tuple[int, int] | None  # (batch, positions) of the model call; None when no model-level call was seen
    ids: list[torch.Tensor] = field(default_factory=list)  # per layer [batch * positions, k], int16
    weights: list[torch.Tensor] = field(default_factory=list)  # per layer [batch * positions, k], float16


class RouterRecorder:
    """Context manager recording each MoE layer's routing per forward call of ``model``.

    Per call it keeps, per layer, the chosen expert ids ``[tokens, k]`` (int16) and their
    router weights (float16; whatever the router hands its experts: renormalised top-k
    probabilities for Mixtral, raw top-k probabilities for Qwen2-MoE / OLMoE without
    ``norm_topk_prob``). Tensors stay on the model's device until read, so recording costs
    no host synchronisation per step. Without the recorder nothing is hooked at all."""

    def __init__(self, model):
        shape = routing_shape(model)
        self.model = model
        self.layers, self.experts, self.k = shape["layers"], shape["experts"], shape["experts_per_token"]
        self.calls: list[_Call] = []
        self._paused = 0
        self._handles: list = []

    # ---- hooks --------------------------------------------------------------------------

    def __enter__(self) -> RouterRecorder:
        if id(self.model) in _ACTIVE:
            raise RuntimeError("a RouterRecorder is already recording this model")
        self._handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for layer, router in enumerate(routers(self.model)):
            self._handles.append(router.register_forward_hook(lambda m, a, o, layer=layer: self._on_route(m, a, o, layer)))
        _ACTIVE[id(self.model)] = self
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _ACTIVE.pop(id(self.model), None)

    @contextlib.contextmanager
    def paused(self):
        """Forward passes inside this block are not recorded (nestable)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def _on_call(self, module, args, kwargs) -> None:
        if self._paused:
            return
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        self.calls.append(_Call(tuple(x.shape[:2]) if x is not None else None))

    def _on_route(self, module, args, output, layer: int) -> None:
        if self._paused:
            return
        if isinstance(output, tuple) and len(output) >= 3:  # transformers >= 5: (logits, top-k weights, top-k ids)
            weights, ids = output[1], output[2]
        else:  # a router returning only logits: its top-k of the softmax, as the MoE block would take it
            logits = output[0] if isinstance(output, tuple) else output
            weights, ids = torch.softmax(logits.float(), dim=-1).topk(self.k, dim=-1)
        if not self.calls or len(self.calls[-1].ids) >= self.layers:
            self.calls.append(_Call(None))  # a router run without a model-level call (e.g. the inner model called directly)
        call = self.calls[-1]
        if len(call.ids) != layer:
            raise RuntimeError(f"router of layer {layer} ran out of order (expected layer {len(call.ids)})")
        call.ids.append(ids.detach().reshape(-1, ids.shape[-1]).to(torch.int16))
        call.weights.append(weights.detach().reshape(-1, weights.shape[-1]).to(torch.float16))

    # ---- reading ------------------------------------------------------------------------

    def clear(self) -> None:
        self.calls.clear()

    def call_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights) of call ``i`` as numpy ``[batch, positions, layers, k]``."""
        call = self.calls[i]
        if len(call.ids) != self.layers:
            raise RuntimeError(f"call {i} recorded {len(call.ids)} of {self.layers} layers")
        ids = torch.stack(call.ids, dim=1).cpu().numpy()  # [tokens, layers, k]
        w = torch.stack(call.weights, dim=1).cpu().numpy()
        b, t = call.shape if call.shape is not None else (1, ids.shape[0])
        return ids.reshape(b, t, self.layers, -1), w.reshape(b, t, self.layers, -1)

    def generation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The calls of one ``model.generate`` as per-token arrays, by the module's convention:
        ``(prompt_ids, prompt_weights, gen_ids, gen_weights)``, prompt arrays
        ``[B, P - 1, layers, k]`` (positions 0..P-2 of the prefill, left padding included)
        and generated arrays ``[B, steps, layers, k]`` (step t: the input that predicted
        generated token t)."""
        if not self.calls:
            raise RuntimeError("no forward call was recorded")
        pre_ids, pre_w = self.call_arrays(0)
        gen_ids, gen_w = [pre_ids[:, -1:]], [pre_w[:, -1:]]
        for i in range(1, len(self.calls)):
            ids, w = self.call_arrays(i)
            if ids.shape[:2] != (pre_ids.shape[0], 1):
                raise RuntimeError(f"decoding call {i} has shape {ids.shape[:2]}, expected ({pre_ids.shape[0]}, 1)")
            gen_ids.append(ids)
            gen_w.append(w)
        return pre_ids[:, :-1], pre_w[:, :-1], np.concatenate(gen_ids, 1), np.concatenate(gen_w, 1)


@contextlib.contextmanager
def paused(model):
    """Pause whatever recorder is recording ``model`` (a no-op when none is): for extra
    forward passes inside generation that are not the model's own routing."""
    rec = _ACTIVE.get(id(model))
    if rec is None:
        yield None
        return
    with rec.paused():
        yield rec
