"""Compact top-k teacher data (``stages.lm.topk_codec``) measured against a real teacher's full
distribution, in one run:

- teacher: SmolLM2-135M-Instruct (``load_lm("smollm2-135m")``, vocabulary 49,152) samples
  ``BENCH_TOPK_PROMPTS`` (100) chat prompts of five reasoning-gym tasks, 24 new tokens each at
  temperature 1; its full next-token distribution at every generated token comes from the same
  ``generate`` call (``output_logits``).
- per k in {16, 32, 64, 128}, for today's float16 format (1) and the compact one (2, from the
  float32 log-probs, and from float16 ones: what ``stages.lm.generation`` hands the writer now):
  the KL from the full teacher distribution to the stored one per token (mean, p99), the stored
  one being its k + 1 buckets as the sparse losses build them (``log_prob_pair``) with the
  "other" mass spread evenly over the remaining tokens; ``kl_buckets`` is the part due to
  storage alone (the KL between the k + 1 buckets; ``kl_full`` adds the truncation's, the same
  for every format of one k); and bytes per stored token of the Parquet parts the writers make
  (``bytes_per_token``: whole parts, text columns included; ``topk_bytes_per_token``: the top-k
  columns). A sweep over the grid step shows what bytes a coarser or finer grid trades.
- ``decode_over_kd_steps``: reading and decoding one part (``TopKFormat.rows``, as ``distill``
  reads teacher data) over the ``kd`` steps that train on its rows (a llama student of hidden 256
  on the teacher's tokenizer, batch 16), median of interleaved repeats with the spread (goal < 0.05).

    python -m bench.topk_storage     (``python -m bench topk_storage`` once bench/__main__.py lists it)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.harness import emit

PROMPTS = int(os.environ.get("BENCH_TOPK_PROMPTS", "100"))
NEW_TOKENS = 24
KS = (16, 32, 64, 128)
TASKS = ("gsm_symbolic", "letter_counting", "basic_arithmetic", "word_sequence_reversal", "spell_backward")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def _prompts(tok) -> list[dict]:
    """Prompt rows (as teacher data stores them) of the five tasks, rendered with the chat template."""
    from stages.lm.chat import render
    from stages.tasks.reasoning import ReasoningTask

    per = -(-PROMPTS // len(TASKS))
    rows = []
    for name in TASKS:
        for r in ReasoningTask(name, sizes=(per, 1, 1)).table().to_pylist()[:per]:
            question = r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
            text = render(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
            rows.append({**r, "id": len(rows), "prompt": text})
    return rows[:PROMPTS]


@torch.no_grad()
def _teacher(model, tok, prompts: list[dict]) -> dict:
    """Per generated token: top-128 ids and float32 log-probs, and sum_v p log p of the full distribution;
    per prompt the generated ids."""
    tok.padding_side = "left"
    ids, lps, plogp, completions = [], [], [], []
    for i in range(0, len(prompts), 25):
        enc = tok([p["prompt"] for p in prompts[i : i + 25]], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(i)
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)  # fmt: skip
        gen = out.sequences[:, enc["input_ids"].shape[1] :]
        steps = [torch.log_softmax(s.float(), -1) for s in out.logits]
        for b in range(gen.shape[0]):
            seq = gen[b].tolist()
            n = next((j + 1 for j, t in enumerate(seq) if t == tok.eos_token_id), len(seq))
            completions.append(seq[:n])
            for t in range(n):
                lp = steps[t][b]
                top = lp.topk(max(KS))
                ids.append(top.indices.numpy())
                lps.append(top.values.numpy())
                plogp.append(float((lp.double().exp() * lp.double()).nan_to_num().sum()))
    return {
        "ids": np.stack(ids),
        "lp": np.stack(lps),
        "plogp": np.array(plogp),
        "completions": completions,
        "lengths": [len(c) for c in completions],
    }


def _stored_buckets(ids: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """The k + 1 bucket log-probs the sparse losses build from stored (ids, log-probs), normalised."""
    from stages.losses.logits import log_prob_pair

    n, k = ids.shape  # the teacher's buckets do not depend on the ids: a k-wide student is enough
    buckets = log_prob_pair(torch.zeros(n, k), (torch.arange(k).expand(n, k), torch.as_tensor(lp, dtype=torch.float32)))[
        1
    ].double()
    return torch.log_softmax(buckets, -1).numpy()


def _kl(teacher: dict, k: int, buckets: np.ndarray, vocab: int) -> dict:
    """KL from the full distribution to the stored one, and its storage part (the k + 1 buckets)."""
    p_top = np.exp(teacher["lp"][:, :k].astype(np.float64))
    tail = np.clip(1 - p_top.sum(1), 1e-300, 1)
    p = np.concatenate([p_top, tail[:, None]], 1)
    kl_buckets = (p * (np.log(p) - buckets)).sum(1)
    rest_plogp = teacher["plogp"] - (p_top * np.log(p_top)).sum(1)
    kl_full = kl_buckets + rest_plogp - tail * np.log(tail / (vocab - k))
    return {"kl_full_mean": float(kl_full.mean()), "kl_full_p99": float(np.percentile(kl_full, 99)),
            "kl_buckets_mean": float(kl_buckets.mean()), "kl_buckets_p99": float(np.percentile(kl_buckets, 99))}  # fmt: skip


def _decoded(ids: np.ndarray, lp: np.ndarray, step: float) -> tuple[np.ndarray, float]:
    from stages.lm.topk_codec import decode, encode

    enc = encode(ids, lp, step=step)
    return decode(enc.ids, enc.codes, enc.tail, step=step)[1], enc.max_error


def _parts(out: Path, prompts: list[dict], teacher: dict, k: int, tok, *, compact: bool) -> dict:
    """Teacher-data parts of ``shard_prompts`` (64) prompts as each writer makes them: the compact
    one through ``teacher_data``'s own row builder and ``TopKWriter``, today's with float16 log-probs
    through a plain ``TableWriter``; bytes per token of the parts and of their top-k columns."""
    from stages.artifacts import LM_TEACHER_DATA, TableWriter
    from stages.lm import topk_codec
    from stages.lm.scoring import scorer
    from stages.lm.teacher_data import _records
    from stages.lm.teachers.base import Completion

    out.mkdir(parents=True)
    writer = topk_codec.TopKWriter(out, LM_TEACHER_DATA) if compact else TableWriter(out, LM_TEACHER_DATA)
    at, tokens = 0, 0
    for lo in range(0, len(prompts), 64):
        chunk, done = prompts[lo : lo + 64], []
        for j in range(len(chunk)):
            c = teacher["completions"][lo + j]
            ids, lp = teacher["ids"][at : at + len(c), :k], teacher["lp"][at : at + len(c), :k]
            at += len(c)
            done.append(Completion(text=tok.decode(c, skip_special_tokens=True), token_ids=c, seq_logprob=float(lp[:, 0].sum()),
                                   topk_ids=ids.reshape(-1).tolist(), topk_logprobs=lp.reshape(-1), k=k, finish_reason="length",
                                   prompt_tokens=0, completion_tokens=len(c)))  # fmt: skip
        records, error = _records(chunk, done, scorer(None), teacher=0, teachers=1, samples=1, k=k)
        if not compact:
            for r, c in zip(records, done, strict=True):
                r.update(topk_logprobs=np.asarray(c.topk_logprobs, np.float16), topk_codes=None, topk_tail=None)
        writer.write(pa.Table.from_pylist(records, schema=LM_TEACHER_DATA), **({"max_error": error} if compact else {}))
        tokens += sum(len(r["token_ids"]) for r in records)
    files = sorted(out.glob("part-*.parquet"))
    top = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema.split(".")[0] in ("topk_ids", "topk_logprobs", "topk_codes", "topk_tail"):
                    top += col.total_compressed_size
    return {"bytes_per_token": sum(f.stat().st_size for f in files) / tokens, "topk_bytes_per_token": top / tokens}


def _topk_bytes(ids: np.ndarray, lp: np.ndarray, lengths: list[int], step: float) -> float:
    """Bytes per token of the three compact top-k columns alone at grid ``step``, written as ``TopKWriter`` does."""
    import io

    from stages.lm.topk_codec import encode, write_options

    enc = encode(ids, lp, step=step)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    k = ids.shape[1]

    def column(values: np.ndarray, per: int, type_: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(bounds * per, pa.int32()), pa.array(values.reshape(-1), type_))

    table = pa.table({"topk_ids": column(enc.ids, k, pa.int32()), "topk_codes": column(enc.codes, k, pa.uint16()),
                      "topk_tail": column(enc.tail, 1, pa.float32())})  # fmt: skip
    sink = io.BytesIO()
    pq.write_table(table, sink, **write_options(table.schema))
    return sink.tell() / len(ids)


def _formats(teacher: dict, prompts: list[dict], vocab: int, work: Path, tok) -> dict:
    """Per k: KL and bytes of format 1 and of format 2 (from float32 and from float16 log-probs)."""
    from stages.lm.topk_codec import STEP

    report = {}
    for k in KS:
        ids, lp = teacher["ids"][:, :k], teacher["lp"][:, :k]
        new_lp, err = _decoded(ids, lp, STEP)
        new16_lp, err16 = _decoded(ids, lp.astype(np.float16), STEP)
        old = _parts(work / f"old{k}", prompts, teacher, k, tok, compact=False)
        new = _parts(work / f"new{k}", prompts, teacher, k, tok, compact=True)
        sweep = {}
        for step in (STEP * 2, STEP / 2):
            s_lp, s_err = _decoded(ids, lp, step)
            sweep[f"1/{round(1 / step)}"] = {"topk_bytes_per_token": _topk_bytes(ids, lp, teacher["lengths"], step), "max_error": s_err,
                                             **_kl(teacher, k, _stored_buckets(ids, s_lp), vocab)}  # fmt: skip
        report[f"k{k}"] = {
            "float16": {"bytes_per_token": old["bytes_per_token"], "topk_bytes_per_token": old["topk_bytes_per_token"],
                        **_kl(teacher, k, _stored_buckets(ids, lp.astype(np.float16)), vocab)},
            "compact": {"bytes_per_token": new["bytes_per_token"], "topk_bytes_per_token": new["topk_bytes_per_token"],
                        "step": f"1/{round(1 / STEP)}", "max_error": err, **_kl(teacher, k, _stored_buckets(ids, new_lp), vocab)},
            "compact_from_float16": {"max_error": err16, **_kl(teacher, k, _stored_buckets(ids, new16_lp), vocab)},
            "other_steps": sweep,
        }  # fmt: skip
    return report


def _decode_vs_kd(work: Path, tok, vocab: int) -> dict:
    """Seconds to read and decode the first k = 64 part against the kd steps over its rows."""
    from stages.config import DistillConfig
    from stages.lm.methods import LM_METHODS
    from stages.lm.methods.token_level import top_k_loss
    from stages.lm.models import LMSize, build_lm
    from stages.lm.topk_codec import TopKFormat
    from stages.lm.training import batches, collate, encode_tokens

    part = sorted((work / "new64").glob("part-*.parquet"))[0]
    fmt = TopKFormat(64, 2)
    rows = fmt.rows(pq.read_table(part))

    def encoded():
        out = []
        for r in rows:
            ids, labels = encode_tokens(tok(r["prompt"], add_special_tokens=False)["input_ids"], r["token_ids"], 512)
            out.append((ids, labels, r["topk"][0], r["topk"][1], 1.0))
        return out

    torch.manual_seed(0)
    student = build_lm("llama", LMSize(hidden=256, layers=2, heads=4, context=512), tok).train()
    loss_fn = top_k_loss(LM_METHODS["kd"], DistillConfig())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    data = [collate(b, tok.pad_token_id) for b in batches(encoded(), 16)]

    def read():
        t0 = time.perf_counter()
        fmt.rows(pq.read_table(part))
        return time.perf_counter() - t0

    def steps():
        t0 = time.perf_counter()
        for b in data:
            opt.zero_grad()
            loss_fn(student, b).backward()
            opt.step()
        return time.perf_counter() - t0

    read(), steps()  # warm-up
    ratios, reads, kd = [], [], []
    for _ in range(3):  # interleaved: the two see the same machine load
        r, s = read(), steps()
        reads.append(r)
        kd.append(s)
        ratios.append(r / s)
    return {"part_rows": len(rows), "part_tokens": int(sum(len(r["token_ids"]) for r in rows)), "kd_steps": len(data),
            "read_decode_s": statistics.median(reads), "kd_steps_s": statistics.median(kd),
            "decode_over_kd_steps": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}  # fmt: skip


def main() -> int:
    from stages.lm.models import load_lm

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model, tok = load_lm("smollm2-135m", "cpu")
    vocab = len(tok)
    prompts = _prompts(tok)
    seconds = {"load": time.perf_counter() - t0}
    teacher = _teacher(model, tok, prompts)
    seconds["teacher"] = time.perf_counter() - t0 - sum(seconds.values())
    del model
    with tempfile.TemporaryDirectory() as tmp:
        formats = _formats(teacher, prompts, vocab, Path(tmp), tok)
        seconds["formats"] = time.perf_counter() - t0 - sum(seconds.values())
        timing = _decode_vs_kd(Path(tmp), tok, vocab)
        seconds["kd_timing"] = time.perf_counter() - t0 - sum(seconds.values())
    k64 = formats["k64"]
    emit(
        "topk_storage",
        teacher="smollm2-135m", vocab=vocab, prompts=len(prompts), tokens=int(len(teacher["ids"])), threads=THREADS,
        bytes_per_token_k64={"float16": k64["float16"]["bytes_per_token"], "compact": k64["compact"]["bytes_per_token"],
                             "goal": 100},
        kl_full_mean_k64={"float16": k64["float16"]["kl_full_mean"], "compact": k64["compact"]["kl_full_mean"]},
        formats=formats, decode_vs_kd=timing, seconds=seconds,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
