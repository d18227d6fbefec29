"""Compact top-k teacher data (``stages.lm.topk_codec``): the codec's properties, both formats
through the one decoder, the writer's Parquet parts, and teacher data through the CLI (format 2
written, format 1 still read, the same kd student from either)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.artifacts import LM_TEACHER_DATA, TableWriter, read_manifest, write_manifest
from stages.errors import DistilError
from stages.lm.topk_codec import MAX_ERROR, NEG_INF, STEP, TopKFormat, TopKWriter, check_resumable, decode, encode, max_error


def _top_k(n: int, k: int, vocab: int = 3000, seed: int = 0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, float64 log-probs best first, true tail) of n peaked random distributions over ``vocab``."""
    g = np.random.default_rng(seed)
    logits = g.standard_normal((n, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, 1)
    return ids, top, 1 - np.exp(top).sum(1)


def _bucket_kl(p_lp, p_tail, q_lp, q_tail) -> np.ndarray:
    """KL from the k + 1 buckets (top-k and tail) of p to those of q, each normalised, per token."""
    p = np.concatenate([np.exp(p_lp), p_tail[:, None]], 1)
    q = np.concatenate([np.exp(np.asarray(q_lp, np.float64)), np.asarray(q_tail, np.float64)[:, None]], 1)
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return np.where(p > 0, p * np.log(p / np.maximum(q, 1e-300)), 0.0).sum(1)


# ---- the codec -----------------------------------------------------------------------------


def test_round_trip_keeps_ids_bounds_the_error_and_stores_the_tail():
    ids, lp, tail = _top_k(200, 32)
    enc = encode(ids, lp)
    assert enc.ids.dtype == np.int32 and enc.codes.dtype == np.uint16 and enc.tail.dtype == np.float32
    out_ids, out_lp, out_tail = decode(enc.ids, enc.codes, enc.tail, step=STEP)
    assert out_ids.dtype == np.int64 and out_lp.dtype == np.float32 and out_tail.dtype == np.float32
    assert (out_ids == ids).all()
    assert (np.diff(out_lp, axis=1) <= 0).all()  # best first
    err = np.abs(out_lp - lp).max()
    assert err <= STEP and enc.max_error == pytest.approx(err, abs=1e-6)
    np.testing.assert_allclose(enc.tail, tail, rtol=1e-6, atol=1e-9)
    # the k + 1 buckets are one distribution: the tail a loss derives is the stored one
    np.testing.assert_allclose(np.exp(out_lp.astype(np.float64)).sum(1) + out_tail, 1.0, atol=1e-6)
    np.testing.assert_allclose(out_tail, tail, rtol=STEP)


def test_codes_are_differences_down_the_top_k():
    ids, lp, _ = _top_k(50, 16, seed=1)
    enc = encode(ids, lp)
    cumulative = np.cumsum(enc.codes.astype(np.int64), axis=1)
    np.testing.assert_array_equal(cumulative, np.rint(-lp / STEP))
    assert enc.codes[:, 1:].max() < enc.codes[:, 0].max() + 1e4  # differences, not the codes themselves


def _as_losses_see_it(ids, lp) -> np.ndarray:
    """The teacher's k + 1 bucket log-probs as the sparse losses build them (``log_prob_pair``)."""
    from stages.losses.logits import log_prob_pair

    n, k = ids.shape  # the teacher's buckets do not depend on the ids: a k-wide student is enough
    pair = (torch.arange(k).expand(n, k), torch.as_tensor(np.asarray(lp, np.float32)))
    return log_prob_pair(torch.zeros(n, k), pair)[1].double().numpy()


def _kl_to(lp, tail, q_buckets) -> np.ndarray:
    return _bucket_kl(lp, tail, q_buckets[:, :-1], np.exp(q_buckets[:, -1]))


def test_stored_distribution_is_closer_to_the_teacher_than_float16():
    """A peaked teacher (top-1 near 0.5, 1 % outside the top-64, as real LMs): float16's derived
    tail is its largest error, which the stored tail removes."""
    ids, lp, tail = _top_k(300, 64, vocab=8000, seed=2, scale=6.0)
    new = decode(*(lambda e: (e.ids, e.codes, e.tail))(encode(ids, lp)), step=STEP)
    kl_new, kl_old = (
        _kl_to(lp, tail, _as_losses_see_it(ids, new[1])),
        _kl_to(lp, tail, _as_losses_see_it(ids, lp.astype(np.float16))),
    )
    assert kl_new.mean() < kl_old.mean() and np.percentile(kl_new, 99) < np.percentile(kl_old, 99)


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_stored_distribution_error_is_second_order_in_the_step(scale):
    """KL(p || q) = Var_p(log q - log p) / 2 to second order, and each log error is within half a step."""
    ids, lp, tail = _top_k(200, 32, vocab=4000, seed=4, scale=scale)
    for step in (STEP, 4 * STEP):
        _, out_lp, out_tail = decode(*(lambda e: (e.ids, e.codes, e.tail))(encode(ids, lp, step=step)), step=step)
        assert _bucket_kl(lp, tail, out_lp, out_tail).max() <= step**2 / 8 * 1.01


def test_unsorted_input_is_put_best_first_and_ties_keep_their_order():
    ids = np.array([[5, 9, 2, 7]])
    lp = np.log(np.array([[0.1, 0.4, 0.1, 0.3]]))
    out_ids, out_lp, _ = decode(*(lambda e: (e.ids, e.codes, e.tail))(encode(ids, lp)), step=STEP)
    assert out_ids.tolist() == [[9, 7, 5, 2]] and (np.diff(out_lp) <= 0).all()


def test_extremes_minus_inf_positive_rounding_and_tiny_log_probs():
    ids = np.array([[1, 2, 3, 4]])
    lp = np.array([[1e-7, -20.0, -700.0, -np.inf]])  # a log-prob rounded above 0, one below the grid, a zero probability
    enc = encode(ids, lp)
    assert np.cumsum(enc.codes.astype(np.int64))[-2:].tolist() == [NEG_INF, NEG_INF]
    _, out_lp, out_tail = decode(enc.ids, enc.codes, enc.tail, step=STEP)
    assert out_lp[0, 2] == out_lp[0, 3] == -np.inf and abs(out_lp[0, 1] + 20.0) <= STEP
    assert out_tail[0] == 0.0 and enc.max_error <= STEP
    # a top-k whose mass exceeds 1 (rounded inputs) is normalised, and the error says by how much
    over = encode(ids[:, :2], np.log([[0.9, 0.15]]))
    assert over.max_error == pytest.approx(math.log(1.05), abs=STEP)
    with pytest.raises(DistilError, match="NaN"):
        encode(ids, np.array([[0.0, np.nan, -1.0, -2.0]]))
    with pytest.raises(DistilError, match="ids"):
        encode(np.array([[-1, 2]]), np.array([[-0.1, -2.0]]))


def test_a_near_uniform_teacher_keeps_its_small_top_k_mass():
    """An untrained teacher: the top-k holds 1 % of the mass and the tail is nearly 1."""
    ids, lp, tail = _top_k(20, 8, vocab=1000, seed=3, scale=0.01)
    _, out_lp, out_tail = decode(*(lambda e: (e.ids, e.codes, e.tail))(encode(ids, lp)), step=STEP)
    assert np.abs(out_lp - lp).max() <= STEP
    np.testing.assert_allclose(out_tail, tail, rtol=1e-4)


# ---- the formats through one decoder ------------------------------------------------------------


def _rows(n_rows: int, k: int, *, compact: bool) -> tuple[list[dict], list]:
    rows, truth = [], []
    for i in range(n_rows):
        n = i % 4  # a row may have no tokens
        ids, lp, _ = _top_k(n, k, seed=10 + i) if n else (np.zeros((0, k), np.int64), np.zeros((0, k)), None)
        row = {"id": i, "token_ids": list(range(n)), "topk_ids": ids.reshape(-1).tolist()}
        if compact:
            enc = encode(ids, lp)
            row |= {"topk_logprobs": None, "topk_codes": enc.codes.reshape(-1).tolist(), "topk_tail": enc.tail.tolist()}
        else:
            row |= {"topk_logprobs": lp.astype(np.float16).reshape(-1).tolist(), "topk_codes": None, "topk_tail": None}
        rows.append(row)
        truth.append((ids, lp))
    return rows, truth


SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("token_ids", pa.list_(pa.int32())),
                    *(LM_TEACHER_DATA.field(c) for c in ("topk_ids", "topk_logprobs", "topk_codes", "topk_tail"))])  # fmt: skip


@pytest.mark.parametrize("compact", [False, True], ids=["format1", "format2"])
def test_part_and_row_decoding_agree(compact):
    k = 6
    rows, truth = _rows(9, k, compact=compact)
    fmt = TopKFormat(k, 2 if compact else 1)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    whole = fmt.table(table)
    for r, part, (ids, lp) in zip(rows, whole, truth, strict=True):
        one = fmt.row(r)
        for a, b in zip(one, part, strict=True):
            np.testing.assert_array_equal(a, b)
        assert part[0].shape == part[1].shape == (len(r["token_ids"]), k) and part[2].shape == (len(r["token_ids"]),)
        assert (part[0] == ids).all() and np.abs(part[1] - lp).max(initial=0) <= (STEP if compact else 2e-2)
    decoded = fmt.rows(table)
    assert all("topk" in r and "topk_ids" not in r and "topk_codes" not in r for r in decoded)
    assert fmt.row(decoded[3]) is decoded[3]["topk"]


def test_old_tables_read_exactly_as_before():
    """A format-1 row decodes to what the readers' reshape gave, and its tail is derived."""
    rows, _ = _rows(4, 5, compact=False)
    r = rows[3]
    ids, lp, tail = TopKFormat(5).row(r)
    np.testing.assert_array_equal(ids, np.asarray(r["topk_ids"]).reshape(3, 5))
    np.testing.assert_array_equal(lp, np.asarray(r["topk_logprobs"], np.float32).reshape(3, 5))
    np.testing.assert_allclose(tail, np.clip(1 - np.exp(lp.astype(np.float64)).sum(1), 0, 1), rtol=1e-6)


def test_format_from_the_manifest_and_bad_rows():
    assert TopKFormat.of({"top_k": 8}) == TopKFormat(8, 1)
    assert TopKFormat.of({"top_k": 8, "topk_format": 2, "topk_step": 0.25}) == TopKFormat(8, 2, 0.25)
    assert TopKFormat(8, 2).manifest(0.003) == {"topk_format": 2, "topk_step": STEP, "topk_max_error": 0.003}
    assert TopKFormat(8, 1).manifest(0.0) == {}
    with pytest.raises(DistilError, match="topk_format 3"):
        TopKFormat.of({"top_k": 8, "topk_format": 3})
    with pytest.raises(DistilError, match="topk_step"):
        TopKFormat.of({"top_k": 8, "topk_format": 2, "topk_step": 0})
    rows, _ = _rows(4, 5, compact=True)
    with pytest.raises(DistilError, match="top-k"):
        TopKFormat(5, 2).row(dict(rows[3], topk_codes=rows[3]["topk_codes"][:-1]))
    with pytest.raises(DistilError, match="top-k"):
        TopKFormat(5, 1).row(rows[3])  # a format-2 row read as format 1: no float16 log-probs
    with pytest.raises(DistilError, match="topk_tail"):
        TopKFormat(5, 2).table(pa.Table.from_pylist([dict(rows[3], topk_tail=[0.5])], schema=SCHEMA))


# ---- the writer ------------------------------------------------------------------------------------


def test_writer_parts_use_byte_stream_split_and_record_their_error(tmp_path):
    rows, _ = _rows(8, 6, compact=True)
    writer = TopKWriter(tmp_path, SCHEMA)
    writer.write(pa.Table.from_pylist(rows, schema=SCHEMA), max_error=0.002)
    writer.write(pa.Table.from_pylist(rows, schema=SCHEMA), max_error=0.003)
    parts = sorted(tmp_path.glob("part-*.parquet"))
    meta = pq.ParquetFile(parts[0]).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    for c in ("topk_ids", "topk_codes", "topk_tail"):
        assert "BYTE_STREAM_SPLIT" in encodings[f"{c}.list.element"]
    assert "RLE_DICTIONARY" in encodings["id"]
    assert pq.read_schema(parts[1]).metadata[MAX_ERROR] == b"0.003" and max_error(parts) == 0.003
    assert pq.read_table(parts[0]).to_pylist() == pa.Table.from_pylist(rows, schema=SCHEMA).to_pylist()


def test_a_partial_from_an_older_distil_is_not_resumed(tmp_path):
    old, _ = _rows(4, 5, compact=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    TableWriter(tmp_path / "old", SCHEMA).write(pa.Table.from_pylist(old, schema=SCHEMA))
    with pytest.raises(DistilError, match="older distil"):
        check_resumable(sorted((tmp_path / "old").glob("part-*.parquet")))
    new, _ = _rows(4, 5, compact=True)
    TopKWriter(tmp_path / "new", SCHEMA).write(pa.Table.from_pylist(new, schema=SCHEMA))
    check_resumable(sorted((tmp_path / "new").glob("part-*.parquet")))


# ---- teacher data through the CLI ------------------------------------------------------------------

K = 8
GEN = ["--set", "data.sizes=[60,12,12]", "--set", "temperature=1.0", "--set", f"top_k={K}", "--set", "max_new_tokens=6",
       "--set", "shard_prompts=16", "-q"]  # fmt: skip
KD = ["--set", "data.sizes=[60,12,12]", "--set", "epochs=2", "--set", "batch_size=8", "--set", "lr=0.01",
      "--set", "temperature=1.0", "--set", "seed=3", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory):
    """A tiny peaked teacher (a random llama whose output layer is scaled up) and its teacher data."""
    from conftest import Cli, write_params

    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.tasks.reasoning import ReasoningTask

    root = tmp_path_factory.mktemp("topk")
    texts = [r["prompt"] + " " + r["answer"] for r in ReasoningTask("basic_arithmetic", sizes=(60, 12, 12)).table().to_pylist()]
    tok = train_tokenizer(texts, 320)
    model = build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=256), tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    Cli(write_params(root)).ok("generate-teacher-data", "--teacher", root / "teacher", "--data", "basic_arithmetic",
                               "--out", root / "td", *GEN)  # fmt: skip
    return root


def test_teacher_data_is_written_compact_and_decodes_to_the_teachers_top_k(teacher_data):
    from stages.lm.models import load_lm

    td = teacher_data / "td"
    manifest = read_manifest(td)
    assert manifest["topk_format"] == 2 and manifest["topk_step"] == STEP and 0 < manifest["topk_max_error"] <= STEP
    fmt = TopKFormat.of(manifest)
    table = pq.read_table(td)
    assert table.column("topk_logprobs").null_count == table.num_rows
    model, tok = load_lm(teacher_data / "teacher")
    checked = 0
    for row in fmt.rows(table)[:12]:
        ids, lp, tail = row["topk"]
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([prompt + row["token_ids"]])).logits[0].float().log_softmax(-1)
        full = full[len(prompt) - 1 : len(prompt) - 1 + len(row["token_ids"])]
        top = full.topk(K, dim=-1)
        assert (ids == top.indices.numpy()).all()
        # generation hands float16 log-probs to the writer: within float16's error and the grid step
        assert np.abs(lp - top.values.numpy()).max() <= STEP + 2e-2
        np.testing.assert_allclose(tail, 1 - top.values.double().exp().sum(-1).numpy(), atol=5e-3)
        checked += len(ids)
    assert checked > 0


def _copy(src, dst, *, compact: bool, model, tok) -> None:
    """``src``'s rows with the top-k re-scored by the teacher in float32, stored in one format."""
    dst.mkdir()
    manifest = read_manifest(src)
    writer = TopKWriter(dst, LM_TEACHER_DATA) if compact else TableWriter(dst, LM_TEACHER_DATA)
    rows, worst = pq.read_table(src).to_pylist(), 0.0
    for r in rows:
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([prompt + r["token_ids"]])).logits[0].float().log_softmax(-1)
        top = full[len(prompt) - 1 : len(prompt) - 1 + len(r["token_ids"])].topk(K, dim=-1)
        ids, lp = top.indices.numpy(), top.values.numpy()
        if compact:
            enc = encode(ids, lp)
            worst = max(worst, enc.max_error)
            r |= {
                "topk_ids": enc.ids.reshape(-1),
                "topk_logprobs": None,
                "topk_codes": enc.codes.reshape(-1),
                "topk_tail": enc.tail,
            }
        else:
            r |= {
                "topk_ids": ids.reshape(-1),
                "topk_logprobs": lp.astype(np.float16).reshape(-1),
                "topk_codes": None,
                "topk_tail": None,
            }
    writer.write(pa.Table.from_pylist(rows, schema=LM_TEACHER_DATA))
    own = ("schema_version", "kind", "rows", "parts", "command", "params", "inputs", "model", "code_version", "content_hash",
           "timing", "topk_format", "topk_step", "topk_max_error")  # fmt: skip
    extra = {k: v for k, v in manifest.items() if k not in own}
    if compact:
        extra |= TopKFormat(K, 2).manifest(worst)
    write_manifest(dst, kind=manifest["kind"], params=manifest["params"], inputs=manifest["inputs"], rows=len(rows),
                   model=manifest["model"], extra=extra)  # fmt: skip


def test_a_kd_student_learns_the_same_from_compact_and_float16_data(teacher_data, tmp_path):
    """One teacher output stored both ways (format 1 is what older distil wrote): the kd student's
    losses agree to 1e-4 (they differ by 1e-7 here)."""
    from conftest import Cli, write_params

    from stages.lm.models import load_lm

    model, tok = load_lm(teacher_data / "teacher")
    _copy(teacher_data / "td", tmp_path / "f1", compact=False, model=model, tok=tok)
    _copy(teacher_data / "td", tmp_path / "f2", compact=True, model=model, tok=tok)
    assert "topk_format" not in read_manifest(tmp_path / "f1") and read_manifest(tmp_path / "f2")["topk_format"] == 2
    cli = Cli(write_params(tmp_path))
    history = {}
    for name in ("f1", "f2"):
        cli.ok("distill", "--method", "kd", "--data", tmp_path / name, "--out", tmp_path / f"s{name}", *KD)
        history[name] = json.loads((tmp_path / f"s{name}" / "training.json").read_text())["history"]
    assert len(history["f1"]) == len(history["f2"]) == 2
    for a, b in zip(history["f1"], history["f2"], strict=True):
        for key in ("train_loss", "dev_loss"):
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)
    assert history["f2"][-1]["dev_loss"] < history["f2"][0]["dev_loss"]  # it learns the teacher


def test_select_keeps_the_format_and_the_columns_as_stored(teacher_data, tmp_path):
    from conftest import Cli, write_params

    Cli(write_params(tmp_path)).ok("select", teacher_data / "td", "--out", tmp_path / "sel", "--by", "length", "-q")
    source, kept = read_manifest(teacher_data / "td"), read_manifest(tmp_path / "sel")
    assert {k: kept[k] for k in ("topk_format", "topk_step", "topk_max_error")} == {
        k: source[k] for k in ("topk_format", "topk_step", "topk_max_error")
    }
    by_id = {r["id"]: r for r in pq.read_table(teacher_data / "td").to_pylist()}
    selected = pq.read_table(tmp_path / "sel").to_pylist()
    assert selected and all(r["topk_codes"] == by_id[r["id"]]["topk_codes"] and r["topk_tail"] == by_id[r["id"]]["topk_tail"]
                            for r in selected)  # fmt: skip
    meta = pq.ParquetFile(sorted((tmp_path / "sel").glob("part-*.parquet"))[0]).metadata.row_group(0)
    paths = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in paths["topk_codes.list.element"]
