"""Routing statistics of a mixture-of-experts model, from recorded expert choices.

Input everywhere: one integer array per sequence of shape ``[tokens, layers, k]``, the
experts each token was routed to in each MoE layer (rank 0 = the router's favourite, as
``torch.topk`` orders them; ``stages.lm.moe.routing`` records them in this form), optionally the
router weights of the same shape. Per layer:

* **load**: each expert's share of all activations (token x rank slots); its entropy in
  nats and normalised by log E (1 = perfectly even use of the E experts).
* **top-1 repeat**: the share of consecutive token pairs of a sequence whose top-1 expert
  is the same (the simplest local routing consistency).
* **SRP** and **SCH**: the two local routing consistency metrics of Liang et al., "Not All
  Models Suit Expert Offloading: On Local Routing Consistency of Mixture-of-Expert Models"
  (arXiv:2505.16056, section 3), implemented from the definitions in the authors' code
  (github.com/ljcleo/moe-lrc: ``src/30_srp_calc.py`` + ``src/31_srp_refine.py`` for SRP,
  ``src/41_sch_calc.py`` for SCH, commit 4ff45dd); see ``srp`` and ``sch`` for the exact
  quantities. Defaults follow the paper: segment length m = 16 (one of its 4/16/64/256)
  and a cache of C = 2 x experts per token ("cache sizes approximately twice the active
  experts").

All functions are numpy, vectorised over tokens, layers and experts (SCH, a cache
simulation, loops over time steps only, with sequences x layers batched).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.errors import DistilError


def _check(seqs: list[np.ndarray], experts: int) -> tuple[list[np.ndarray], int, int]:
    seqs = [np.asarray(s) for s in seqs]
    seqs = [s for s in seqs if s.shape[0] > 0]
    if not seqs:
        raise DistilError("no routed tokens to measure; the sequences are empty")
    layers, k = seqs[0].shape[1:]
    for s in seqs:
        if s.ndim != 3 or s.shape[1:] != (layers, k):
            raise DistilError(f"routing arrays must all be [tokens, {layers}, {k}], got {s.shape}")
        if s.min() < 0 or s.max() >= experts:
            raise DistilError(f"expert ids must lie in [0, {experts}), got {s.min()}..{s.max()}")
    return [s.astype(np.int64) for s in seqs], layers, k


def _one_hot(ids: np.ndarray, experts: int) -> np.ndarray:
    """[tokens, layers, k] ids -> [tokens, layers, experts] 0/1 activation mask."""
    mask = np.zeros((*ids.shape[:2], experts), dtype=np.int32)
    np.put_along_axis(mask, ids, 1, axis=2)
    return mask


def expert_load(seqs: list[np.ndarray], experts: int) -> np.ndarray:
    """[layers, experts]: each expert's share of the layer's activations (rows sum to 1)."""
    seqs, layers, _ = _check(seqs, experts)
    counts = np.zeros((layers, experts), dtype=np.int64)
    for s in seqs:
        counts += _one_hot(s, experts).sum(axis=0)
    return counts / counts.sum(axis=1, keepdims=True)


def load_entropy(load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised, nats) entropy of each layer's load ``[layers, experts]``: H = -sum p ln p,
    normalised by ln E (1.0 for a single expert, where there is no choice to spread)."""
    p = np.asarray(load, dtype=np.float64)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    e = p.shape[-1]
    return (h / np.log(e) if e > 1 else np.ones_like(h)), h


def _top1(s: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    if w is None:
        return s[..., 0]
    return np.take_along_axis(s, np.asarray(w, dtype=np.float32).argmax(-1)[..., None], axis=-1)[..., 0]


def top1_repeat(seqs: list[np.ndarray], experts: int, weights: list[np.ndarray] | None = None) -> np.ndarray:
    """[layers]: share of consecutive token pairs (within a sequence) routed to the same
    top-1 expert; the top-1 is rank 0, or the highest weight when ``weights`` are given.
    NaN where no sequence has two tokens."""
    if weights is not None:
        weights = [np.asarray(w) for w, s in zip(weights, seqs, strict=True) if np.asarray(s).shape[0] > 0]
    seqs, layers, _ = _check(seqs, experts)
    same, pairs = np.zeros(layers), 0
    for i, s in enumerate(seqs):
        top = _top1(s, weights[i] if weights is not None else None)  # [tokens, layers]
        same += (top[1:] == top[:-1]).sum(axis=0)
        pairs += len(top) - 1
    return same / pairs if pairs else np.full(layers, np.nan)


def _best_f1(hist: np.ndarray, segment: int) -> np.ndarray:
    """SRP from window-count histograms ``[..., m + 1]`` (entry v: how many (window, expert)
    pairs had the expert active on v of the window's m tokens); see ``srp``."""
    v = np.arange(segment + 1)
    tail = lambda a: np.flip(np.cumsum(np.flip(a, -1), -1), -1)  # noqa: E731 - sum over v >= t
    matched = tail(hist * v)  # TP(t)
    predicted = segment * tail(hist)  # P(t)
    actual = matched[..., :1]  # A
    return (2 * matched / np.maximum(predicted + actual, 1)).max(-1)


def srp_histogram(seqs: list[np.ndarray], experts: int, segment: int) -> np.ndarray:
    """[layers, m + 1]: over every window of ``segment`` consecutive tokens of every
    sequence (sliding, one per start position) and every expert, how often the expert was
    active on exactly v of the window's tokens. Sequences shorter than the segment have no
    window and add nothing (as in the authors' code, which needs a full segment)."""
    seqs, layers, _ = _check(seqs, experts)
    hist = np.zeros((layers, segment + 1), dtype=np.int64)
    offset = (np.arange(layers) * (segment + 1))[None, :, None]
    for s in seqs:
        if len(s) < segment:
            continue
        cs = np.concatenate([np.zeros((1, layers, experts), np.int32), np.cumsum(_one_hot(s, experts), axis=0)])
        window = cs[segment:] - cs[:-segment]  # [windows, layers, experts], values 0..m
        hist += np.bincount((window + offset).ravel(), minlength=layers * (segment + 1)).reshape(layers, segment + 1)
    return hist


def srp(seqs: list[np.ndarray], experts: int, segment: int = 16) -> tuple[np.ndarray, float]:
    """Segment Routing best Performance (Liang et al. 2025, sec. 3, SRP): per layer, and
    for the whole model (all layers pooled, one threshold), how well a *segment routing*
    (each window of m tokens sends all its tokens to one fixed set of experts) can match the
    real token routing, as the best F1 over segment routings of the form "use expert e for
    the whole window if it is active on at least t of its tokens":

        c_{w,e}  = tokens of window w routed to expert e  (0..m)
        TP(t)    = sum_{w,e} [c_{w,e} >= t] c_{w,e}       matched activations
        P(t)     = sum_{w,e} [c_{w,e} >= t] m             predicted activations
        A        = sum_{w,e} c_{w,e}                      real activations
        SRP      = max_{t = 0..m} 2 TP(t) / max(P(t) + A, 1)

    over all sliding windows of all sequences (the statistic of ``30_srp_calc.py`` /
    ``31_srp_refine.py``: best F1 of the pooled match / prediction / activation counts;
    for a fixed number of predicted (window, expert) pairs the threshold rule maximises
    TP, so it is the best segment routing). 1 = routing constant within every segment.
    NaN when no sequence has ``segment`` tokens.

    Returns (per-layer SRP [layers], model SRP)."""
    if segment < 1:
        raise DistilError(f"the SRP segment length must be >= 1, got {segment}")
    hist = srp_histogram(seqs, experts, segment)
    if not hist.any():
        return np.full(hist.shape[0], np.nan), float("nan")
    return _best_f1(hist, segment), float(_best_f1(hist.sum(0), segment))


def sch(seqs: list[np.ndarray], experts: int, segment: int = 16, cache: int = 0, *, chunk_cells: int = 1 << 24) -> np.ndarray:
    """Segment Cache best Hit rate (Liang et al. 2025, sec. 3, SCH): per layer, the hit
    rate of a C-expert cache that sees the routing of the next m tokens (``calc_fsf`` in
    ``41_sch_calc.py``, read at the given cache size):

    * tokens are served in order; each of a token's k experts hits if it is in the cache
      before the token (all k are checked against that state). A first use of an expert
      while the cache still has a free slot counts as a hit (the slot is filled ahead of
      time, as the authors' stack simulation counts it); later misses load the expert.
    * loading into a full cache evicts the cached expert with the lowest priority
      (uses in the next m tokens, starting at the current one, then the older last use):
      the current token's experts already served count only their later uses.
    * per sequence hits / (tokens x k); SCH = the mean over sequences. Windows are cut
      at the end of a sequence, so any length counts.

    ``cache`` 0 = 2 x experts per token. Returns [layers]."""
    seqs, layers, k = _check(seqs, experts)
    if segment < 1:
        raise DistilError(f"the SCH future length must be >= 1, got {segment}")
    cache = cache or 2 * k
    if cache < 1:
        raise DistilError(f"the SCH cache size must be >= 1 expert, got {cache}")
    rates = []
    per_seq = layers * max(len(s) for s in seqs) * experts
    step = max(1, chunk_cells // max(per_seq, 1))
    for lo in range(0, len(seqs), step):
        rates.append(_sch_rates(seqs[lo : lo + step], experts, segment, cache))
    return np.concatenate(rates).mean(0)


def _sch_rates(seqs: list[np.ndarray], experts: int, segment: int, cache: int) -> np.ndarray:
    """[sequences, layers] hit rates: one cache per (sequence, layer), all simulated together."""
    n, layers, k = len(seqs), seqs[0].shape[1], seqs[0].shape[2]
    tmax = max(len(s) for s in seqs)
    b = n * layers  # batch row = sequence * layers + layer
    ids = np.zeros((b, tmax, k), dtype=np.int64)
    lens = np.zeros(b, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i * layers : (i + 1) * layers, : len(s)] = s.transpose(1, 0, 2)
        lens[i * layers : (i + 1) * layers] = len(s)
    mask = np.zeros((b, tmax, experts), dtype=np.int32)
    np.put_along_axis(mask, ids, 1, axis=2)
    cs = np.concatenate([np.zeros((b, 1, experts), np.int32), np.cumsum(mask, axis=1)], axis=1)  # [b, T + 1, E]
    rows = np.arange(b)
    cached = np.zeros((b, experts), dtype=bool)
    last = np.zeros((b, experts), dtype=np.int64)  # time of last use (0 = never)
    hits = np.zeros(b, dtype=np.int64)
    big, ts = tmax * k + 2, 0  # priority = future uses * big + last use: uses first, recency breaks ties
    for t in range(tmax):
        live = t < lens
        future = cs[rows, np.minimum(t + segment, lens)] - cs[rows, t]  # uses in [t, t + m), cut at the end
        before = cached.copy()
        free = cache - before.sum(1)
        new = np.zeros(b, dtype=np.int64)
        for j in range(k):
            x = ids[:, t, j]
            was = before[rows, x]
            hits += live & (was | (new < free))
            new += ~was
        for j in range(k):
            x = ids[:, t, j]
            load = live & ~cached[rows, x]
            evict = load & (cached.sum(1) >= cache)
            if evict.any():
                prio = np.where(cached, future * big + last, np.iinfo(np.int64).max)
                victim = prio.argmin(1)
                cached[rows[evict], victim[evict]] = False
            cached[rows[load], x[load]] = True
            ts += 1
            future[rows[live], x[live]] -= 1  # this use is now past
            last[rows[live], x[live]] = ts
    return (hits / np.maximum(lens * k, 1)).reshape(n, layers)


def routing_metrics(seqs: list[np.ndarray], experts: int, *, weights: list[np.ndarray] | None = None, segment: int = 16,
                    cache: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:  # fmt: skip
    """All of the above: (flat summary, one row per layer, load [layers, experts]).

    Summary keys (``routing_*``): mean over layers of the normalised load entropy, its nats,
    the top-1 repeat share and SCH; the model-level SRP (layers pooled); the tokens
    measured and the m and C used."""
    seqs = [np.asarray(s) for s in seqs]
    seqs_ok, layers, k = _check(seqs, experts)
    cache = cache or 2 * k
    load = expert_load(seqs_ok, experts)
    ent, nats = load_entropy(load)
    repeat = top1_repeat(seqs, experts, weights)
    srp_layers, srp_model = srp(seqs_ok, experts, segment)
    sch_layers = sch(seqs_ok, experts, segment, cache)
    summary = {
        "routing_load_entropy": float(ent.mean()),
        "routing_load_entropy_nats": float(nats.mean()),
        "routing_top1_repeat": float(repeat.mean()),
        "routing_srp": srp_model,
        "routing_sch": float(sch_layers.mean()),
        "routing_tokens": int(sum(len(s) for s in seqs_ok)),
        "routing_segment": int(segment),
        "routing_cache": int(cache),
    }
    table = [
        {"layer": i, "load_entropy": float(ent[i]), "load_entropy_nats": float(nats[i]), "top1_repeat": float(repeat[i]),
         "srp": float(srp_layers[i]), "sch": float(sch_layers[i]), "max_load": float(load[i].max()),
         "min_load": float(load[i].min())}
        for i in range(layers)
    ]  # fmt: skip
    return summary, table, load
