"""Compact top-k teacher data, and the one decoder every reader of LM teacher data calls.

The manifest's ``topk_format`` says how a table stores each generated token's top-k:

- 1 (no ``topk_format``: tables written before this module): ``topk_ids`` list<int32> and
  ``topk_logprobs`` list<float16>, token-major, k per token, best first.
- 2: ``topk_ids`` as in format 1 (best first), ``topk_logprobs`` null, and
  ``topk_codes`` list<uint16>: the log-probs on a grid of ``topk_step`` nats (1/256 by default):
  c_j = round(-logprob_j / step), non-decreasing down a token's top-k, stored as c_1 then the
  increments c_j - c_{j-1} (a running total of 65535 is -inf, as are log-probs below -65534.5 x
  step: below float32's smallest probability);
  ``topk_tail`` list<float32>: per token the mass outside the stored top-k, 1 - sum exp(logprob)
  of the log-probs the teacher gave (in float64, clipped at 0): the "other" bucket of the sparse
  losses (``stages.losses.logits``), stored rather than derived from rounded log-probs.

``TopKFormat.row`` / ``TopKFormat.table`` give, whatever the format, per row (ids int64 [n, k],
log-probs float32 [n, k] best first, tail float32 [n]). Format 2 is decoded with its k + 1
buckets normalised together (each top-k probability and the tail divided by their sum), so
``1 - sum exp(logprobs)`` is the stored tail: every sparse divergence, which derives its "other"
bucket that way (``log_prob_pair`` and the fused ``stages.losses.fused``: kd, reverse-kl, jsd,
skew-kl, tvd, and tsd and mst through them), uses the stored tail with no change to the losses;
the cross-tokenizer losses (uld, span-kd) have no "other" bucket. The decoded log-probs are within
``step`` of the teacher's (half a step from the grid, at most half a step from the normalisation,
for a top-k whose mass is at most 1), and the largest error measured when writing is the manifest's
``topk_max_error``. Format 1 decodes as it always read (the tail derived, clipped at 0).

Choices, measured on SmolLM2-135M-Instruct teacher data (100 chat prompts of five reasoning-gym
tasks, 2,684 sampled tokens, vocabulary 49,152, k = 64; bytes per token of the top-k columns, zstd;
bucket KL = KL from the teacher's k + 1 buckets to the stored ones as the losses build them):

- format 1: 225 B (ids 118, float16 log-probs 107); bucket KL 3.9e-6, mostly from the tail derived
  from float16 values (negative, so clipped, on 1.3 % of tokens).
- log-probs: grid steps 1/128, 1/256, 1/512 give bucket KL 1.3e-6, 3.3e-7, 8e-8; down a token's
  top-k the code increments are small: at 1/128 BYTE_STREAM_SPLIT + zstd stores them in 43 B
  (dictionary 54 B, plain 61 B), each halving of the step adds about 8 B. 1/256 is the default:
  on a flatter synthetic teacher (top-1 near 0.3) float16 beats 1/128 seven-fold, 1/256 by < 2x.
- ids: sorted ascending as gaps they take 70 B (BYTE_STREAM_SPLIT; plain 87, dictionary 91)
  against 107 B best first (dictionary 118), but sorted ids put the codes in id order, where they
  cost 84 B at step 1/128 against 43 B as increments best first: best first is smaller for every
  step finer than 1/16 (150 against 154 B at 1/128; sorted wins only at 1/8, 122 against 127 B), so
  ids stay best first, as readers expect them. uint16 ids cost the same bytes as int32 (Parquet
  stores both as INT32 and the high-byte streams compress to nothing), so int32 stays: any
  vocabulary fits.
- tail: float32, BYTE_STREAM_SPLIT, 3.8 B per token (float16: 2.1 B, but it loses tails below 6e-8).
- zstd levels 1 to 19 differ by under 2 %: the default level is kept.
- a square-root grid (sqrt(p) rounded to a step, best first as decrements: its bucket KL is at most
  about k x step^2 / 6 whatever the teacher) was measured and not adopted: 148 B at k = 64 with bucket
  KL 2.5e-6 at step 2^-11 (2^-12: 149 B, 6.2e-7; 2^-10: 137 B, 9.8e-6), against this format's 165 B
  and 3.4e-7: 10 % fewer bytes for 7x the KL, what this grid gives at 1/128 (152 B, 1.3e-6); not
  worth a third format to read forever.
- the floor at k = 64 is the ids: sorted and gap-coded they take 72 B (their gap entropy is 71.7 B),
  best first 106 B; the values cost at least 30 B best first at this precision and 65 B in id order.
  A set coder with a per-dataset unigram model of the ids would reach 52 B at its entropy bound, but
  only with the values in id order: about 117 B in all. 100 B at float16's KL needs a context model
  of the ids (the teacher's own predictions), which no Parquet encoding gives.
- cheap contexts do not help: of a token's top-64, 13 ids on average (median 10) are in the top-64
  of the token before it and 25 in the union of the 4 before it, too few to code the ids as
  references; an ideal coder of the ids best first with a unigram model per rank band of the
  dataset's own counts would need 86-89 B (95-98 B with the model fitted on half the data and
  applied to the other), before the 30-43 B of the values.

``bench/topk_storage.py`` measures the result on fresh teacher data against the full distribution
(``bench/results/topk_storage.json``: 165 B of top-k columns per token at k = 64 against float16's
229 B, bucket KL 3.4e-7 against 3.0e-6). The ids are the floor: no step brings k = 64 to 100 B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.artifacts import TableWriter
from stages.artifacts.store import _fsync_replace
from stages.errors import DistilError

FORMAT = 2
STEP = 1 / 256
"""Grid of the stored log-probs, in nats (a power of two: exact in binary). Its rounding error, at most
1/512, is float16's for log-probs in [-8, -4), where most of a real teacher's top-k lie."""
NEG_INF = 65535
"""The code of -inf (and of log-probs too small for the grid)."""
COMPACT = ("topk_ids", "topk_codes", "topk_tail")
"""Columns written with BYTE_STREAM_SPLIT instead of dictionary encoding."""
MAX_ERROR = b"distil.topk_max_error"
"""Parquet key-value metadata of a format-2 part: its largest log-prob error, as text."""

TopK = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(ids int64 [n, k], log-probs float32 [n, k] best first, tail mass float32 [n])."""


@dataclass(frozen=True)
class Encoded:
    """One row's top-k in format 2: ``ids`` int32 [n, k], ``codes`` uint16 [n, k], ``tail``
    float32 [n], and ``max_error`` the largest |decoded - given| log-prob (0 without tokens)."""

    ids: np.ndarray
    codes: np.ndarray
    tail: np.ndarray
    max_error: float


def encode(ids, logprobs, *, step: float = STEP) -> Encoded:
    """Format 2 of ``ids`` / ``logprobs`` [n, k] (any int / float dtype). Each token's entries are
    put best first (a stable sort: sorted input keeps its order, ties included); NaN or +inf
    log-probs are refused."""
    ids, lp = np.asarray(ids), np.asarray(logprobs, np.float64)
    if ids.shape != lp.shape or ids.ndim != 2:
        raise DistilError(f"top-k ids {ids.shape} and log-probs {lp.shape} must both be [tokens, k]; regenerate the teacher data")
    if np.isnan(lp).any() or np.isposinf(lp).any():
        raise DistilError("the teacher returned NaN or +inf top-k log-probs; check the teacher (a served one's logprobs)")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise DistilError(f"top-k token ids must lie in [0, 2^31), got {ids.min()}..{ids.max()}")
    if not 0 < step <= 1:
        raise DistilError(f"topk step must be in (0, 1] nats, got {step}")
    order = np.argsort(-lp, axis=1, kind="stable")
    ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        cumulative = np.where(np.isfinite(lp), np.minimum(np.rint(np.maximum(-lp, 0.0) / step), NEG_INF), NEG_INF)
    cumulative = cumulative.astype(np.int64)
    codes = np.diff(cumulative, axis=1, prepend=0).astype(np.uint16)
    tail = np.clip(1.0 - np.exp(lp).sum(1), 0.0, 1.0).astype(np.float32)
    _, dec, _ = decode(ids, codes, tail, step=step)
    on_grid = cumulative < NEG_INF
    err = float(np.abs(dec.astype(np.float64)[on_grid] - lp[on_grid]).max()) if on_grid.any() else 0.0
    return Encoded(ids.astype(np.int32), codes, tail, err)


def decode(ids, codes, tail, *, step: float) -> TopK:
    """Format 2 back to (ids int64 [n, k], log-probs float32 [n, k], tail float32 [n]), the k + 1
    buckets normalised together. ``ids`` / ``codes`` [n, k], ``tail`` [n]."""
    codes = np.cumsum(np.asarray(codes, np.int64), axis=1)
    with np.errstate(divide="ignore"):
        q = np.where(codes >= NEG_INF, -np.inf, -codes * step)
        tail = np.asarray(tail, np.float64)
        mass = np.maximum(np.exp(q).sum(1) + tail, np.finfo(np.float64).tiny)
        log_z = np.log(mass)
    lp = q - log_z[:, None]
    return np.asarray(ids, np.int64), lp.astype(np.float32), (tail / mass).astype(np.float32)


def legacy(ids, logprobs) -> TopK:
    """Format 1 as it always read: ids and log-probs reshaped, the tail derived (clipped at 0)."""
    lp = np.asarray(logprobs, np.float32)
    tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
    return np.asarray(ids, np.int64), lp, tail


@dataclass(frozen=True)
class TopKFormat:
    """How a table stores its top-k (``version``), ``k`` per token and the grid ``step``."""

    k: int
    version: int = 1
    step: float = STEP

    @classmethod
    def of(cls, manifest: dict) -> TopKFormat:
        """The format a teacher-data (or selection) manifest declares; no ``topk_format`` is 1."""
        version, step = manifest.get("topk_format", 1), manifest.get("topk_step", STEP)
        if version not in (1, FORMAT):
            raise DistilError(
                f"teacher data has topk_format {version!r}; this distil reads formats 1 and {FORMAT}: upgrade distil"
            )
        if version == FORMAT and not (isinstance(step, (int, float)) and 0 < step <= 1):
            raise DistilError(f"teacher data has topk_step {step!r}; it must be in (0, 1]: regenerate the teacher data")
        return cls(int(manifest.get("top_k", 0) or 0), version, float(step))

    def row(self, r: dict) -> TopK:
        """The top-k of one row dict: its ``topk`` when a reader already decoded it, else its columns."""
        if "topk" in r:
            return r["topk"]
        n, k = len(r["token_ids"]), self.k
        ids = _listed(r, "topk_ids")
        if self.version == 1:
            lp = _listed(r, "topk_logprobs")
            self._check(n, len(ids), len(lp), n * k, "topk_logprobs")
            return legacy(np.asarray(ids).reshape(n, k), np.asarray(lp, np.float32).reshape(n, k))
        codes, tail = _listed(r, "topk_codes"), _listed(r, "topk_tail")
        self._check(n, len(ids), len(codes), n * k, "topk_codes")
        self._check(n, len(tail), len(tail), n, "topk_tail")
        return decode(np.asarray(ids).reshape(n, k), np.asarray(codes).reshape(n, k), np.asarray(tail), step=self.step)

    def table(self, table: pa.Table) -> list[TopK]:
        """The top-k of every row of a part, decoded in one pass over its columns."""
        n = np.asarray(pc.list_value_length(table.column("token_ids")).fill_null(0), np.int64)
        tokens, k = int(n.sum()), self.k
        if self.version == 1:
            self._check_table(table, n, ["topk_ids", "topk_logprobs"], k)
            ids, lp = _values(table, "topk_ids"), _values(table, "topk_logprobs")
            flat = legacy(ids.reshape(tokens, k), lp.reshape(tokens, k))
        else:
            self._check_table(table, n, ["topk_ids", "topk_codes"], k)
            self._check_table(table, n, ["topk_tail"], 1)
            ids, codes, tail = (_values(table, c) for c in ("topk_ids", "topk_codes", "topk_tail"))
            flat = decode(ids.reshape(tokens, k), codes.reshape(tokens, k), tail, step=self.step)
        bounds = np.concatenate([[0], np.cumsum(n)])
        return [tuple(a[bounds[i] : bounds[i + 1]] for a in flat) for i in range(len(n))]

    def rows(self, table: pa.Table) -> list[dict]:
        """A part's rows as dicts, their stored top-k columns replaced by the decoded ``topk``
        (what ``row`` returns): Python lists of n x k values are never built."""
        stored = [c for c in ("topk_ids", "topk_logprobs", "topk_codes", "topk_tail") if c in table.schema.names]
        rows = table.drop_columns(stored).to_pylist()
        for r, top in zip(rows, self.table(table), strict=True):
            r["topk"] = top
        return rows

    def manifest(self, max_error: float) -> dict:
        """The manifest keys of a table written in this format."""
        return (
            {"topk_format": self.version, "topk_step": self.step, "topk_max_error": max_error} if self.version == FORMAT else {}
        )

    def _check(self, n: int, got_a: int, got_b: int, want: int, column: str) -> None:
        if got_a != want or got_b != want:
            raise DistilError(f"a teacher-data row has {n} tokens but {got_a} top-k ids and {got_b} {column} values "
                              f"(k = {self.k}, topk_format {self.version}); regenerate the teacher data")  # fmt: skip

    def _check_table(self, table: pa.Table, n: np.ndarray, columns: list[str], per_token: int) -> None:
        for c in columns:
            if c not in table.schema.names:
                raise DistilError(f"teacher data in topk_format {self.version} needs column '{c}'; regenerate the teacher data")
            got = np.asarray(pc.list_value_length(table.column(c)).fill_null(0), np.int64)
            if (got != n * per_token).any():
                i = int(np.flatnonzero(got != n * per_token)[0])
                raise DistilError(f"a teacher-data row has {n[i]} tokens but {got[i]} top-k {c} values "
                                  f"(k = {self.k}, topk_format {self.version}); regenerate the teacher data")  # fmt: skip


def _listed(row: dict, column: str):
    """A row's list column (a list or an array); an absent or null one is empty."""
    value = row.get(column)
    return [] if value is None else value


def _values(table: pa.Table, column: str) -> np.ndarray:
    """The flattened values of a list column (nulls count as empty lists)."""
    col = table.column(column).combine_chunks() if table.num_rows else pa.array([], table.schema.field(column).type)
    return np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False))


def write_options(schema: pa.Schema) -> dict:
    """``pq.write_table`` options of a teacher-data part: zstd, BYTE_STREAM_SPLIT for the compact
    top-k columns, dictionary encoding for the others (pyarrow's default)."""
    leaves = [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in schema]
    compact = {f"{c}.list.element" for c in COMPACT}
    return {"compression": "zstd", "use_dictionary": [p for p in leaves if p not in compact],
            "column_encoding": {p: "BYTE_STREAM_SPLIT" for p in leaves if p in compact}}  # fmt: skip


class TopKWriter(TableWriter):
    """A ``TableWriter`` for teacher data: each part also holds its largest top-k log-prob error in
    its key-value metadata (``MAX_ERROR``) and is then rewritten with ``write_options``. The part is
    first written by ``TableWriter.write``, the atomic write every stage shares (and the kill points
    of the resume tests); the rewrite replaces it atomically too, so a kill between the two leaves
    a complete part in pyarrow's default encodings, which reads the same. (With write options on
    ``TableWriter`` itself the second write would go.)"""

    def write(self, table: pa.Table, max_error: float | None = None) -> None:
        schema, before = self.schema, len(self.parts)
        if max_error is not None:
            self.schema = schema.with_metadata({**(schema.metadata or {}), MAX_ERROR: repr(float(max_error)).encode()})
        try:
            super().write(table)
        finally:
            self.schema = schema
        if len(self.parts) > before:
            part = self.parts[-1]
            tmp = part.with_name(f".{part.name}.tmp-{os.getpid()}")
            pq.write_table(pq.read_table(part), tmp, **write_options(schema))
            _fsync_replace(tmp, part)


def check_resumable(parts) -> None:
    """Refuse to resume a partial whose parts an older distil wrote in format 1: a table holds one format."""
    for p in parts:
        names = pq.read_schema(p).names
        if "topk_logprobs" in names and pq.read_table(p, columns=["topk_logprobs"]).column(0).null_count == 0:
            raise DistilError(
                f"{p.parent} was started by an older distil (topk_format 1); delete it to regenerate the teacher data"
            )


def max_error(parts) -> float:
    """The largest ``MAX_ERROR`` recorded in the parts (0 when none records one)."""
    worst = 0.0
    for p in parts:
        meta = pq.read_schema(p).metadata or {}
        if MAX_ERROR in meta:
            worst = max(worst, float(meta[MAX_ERROR]))
    return worst
