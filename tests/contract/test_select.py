"""`distil select` below the CLI: the shared `Tally` (pass-through of unselected splits,
per-split counts), then `stages.select.run` on the session's classifier teacher data and
on a hand-written LM teacher-data table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import select as select_stage
from stages.artifacts import LM_SELECTION, LM_TEACHER_DATA, MANIFEST, SELECTION, Kind, TableWriter, write_manifest
from stages.config import SelectConfig
from stages.errors import DistilError
from stages.metrics import softmax
from stages.selection import Tally

# ---- Tally -------------------------------------------------------------------------------


def _table(splits):
    return pa.table({"id": list(range(len(splits))), "split": splits})


def test_tally_passes_unselected_splits_through_with_weight_one():
    tally = Tally(["train"])
    out = tally.apply(
        _table(["train", "train", "dev", "test", "train"]),
        np.array([False, True, False, False, True]),
        np.array([0.2, 0.8, 0.3, 0.4, 0.6]),
        np.array(["a", "b", "c", "d", "e"]),
    )
    assert out.column("id").to_pylist() == [1, 2, 3, 4]
    assert out.column("weight").type == pa.float32()
    np.testing.assert_allclose(out.column("weight").to_numpy(), [0.8, 1.0, 1.0, 0.6], rtol=1e-6)
    assert out.column("reason").to_pylist() == ["b", "passthrough", "passthrough", "e"]
    assert tally.counts == {"train": [2, 3], "dev": [1, 1], "test": [1, 1]}
    assert tally.kept_any


def test_tally_counts_accumulate_over_batches_and_stats_give_shares():
    tally = Tally(["train", "dev"])
    tally.apply(_table(["train", "dev"]), np.array([True, False]), np.ones(2), np.array(["k", "x"]))
    tally.apply(_table(["train", "train", "dev", "test"]), np.array([False, True, True, False]), np.ones(4) * 0.5,
                np.array(["x", "k", "k", "x"]))  # fmt: skip
    stats = tally.stats()
    assert stats["train"] == {"kept": 2, "rows": 3, "share": pytest.approx(2 / 3)}
    assert stats["dev"] == {"kept": 1, "rows": 2, "share": 0.5}
    assert stats["test"] == {"kept": 1, "rows": 1, "share": 1.0}  # test is not selected: passes through


def test_tally_kept_any_looks_only_at_selected_splits():
    tally = Tally(["train"])
    out = tally.apply(_table(["train", "dev", "test"]), np.zeros(3, bool), np.zeros(3), np.array(["x", "y", "z"]))
    assert out.num_rows == 2 and set(out.column("reason").to_pylist()) == {"passthrough"}
    assert not tally.kept_any
    assert tally.stats()["train"] == {"kept": 0, "rows": 1, "share": 0.0}


def test_tally_a_selected_split_with_no_rows_is_counted_as_empty():
    tally = Tally(["train"])
    tally.apply(_table(["dev"]), np.array([True]), np.array([0.5]), np.array(["r"]))
    assert not tally.kept_any
    assert tally.stats()["train"] == {"kept": 0, "rows": 0, "share": 0.0}
    assert tally.stats()["dev"]["share"] == 1.0


def test_tally_empty_table():
    tally = Tally(["train"])
    out = tally.apply(_table([]), np.zeros(0, bool), np.zeros(0), np.zeros(0, dtype=str))
    assert out.num_rows == 0 and out.schema.names == ["id", "split", "weight", "reason"]


# ---- classifier selection on the session's teacher data ----------------------------------


@pytest.fixture(scope="module")
def teacher_rows(tiny_run):
    table = pq.read_table(tiny_run["tdata"])
    logits = np.asarray(table.column("logits").to_pylist(), np.float32).astype(np.float64)
    probs = softmax(logits)
    return {
        "id": np.asarray(table.column("id").to_pylist()),
        "split": np.asarray(table.column("split").to_pylist()),
        "label": np.asarray(table.column("label").to_pylist()),
        "pred": probs.argmax(1),
        "conf": probs.max(1),
    }


def _selected(out):
    table = pq.read_table(out)
    assert table.schema.names == SELECTION.names
    return table, json.loads((out / MANIFEST).read_text())


def _check_passthrough(table, rows, splits=("dev", "test")):
    split = np.asarray(table.column("split").to_pylist())
    for s in splits:
        ids = sorted(np.asarray(table.column("id").to_pylist())[split == s].tolist())
        assert ids == sorted(rows["id"][rows["split"] == s].tolist()), f"{s} rows did not all pass through"
        assert np.all(table.column("weight").to_numpy()[split == s] == 1.0)
        assert set(np.asarray(table.column("reason").to_pylist())[split == s]) == {"passthrough"}


def _check_stats(table, manifest):
    split = np.asarray(table.column("split").to_pylist())
    stats = manifest["selection"]
    assert manifest["kind"] == Kind.SELECTION and manifest["rows"] == table.num_rows
    for s, entry in stats.items():
        assert entry["kept"] == int((split == s).sum()), s
        assert entry["share"] == pytest.approx(entry["kept"] / entry["rows"])
    assert sum(e["rows"] for e in stats.values()) == 180


def test_confident_require_correct_keeps_exactly_the_teacher_correct_train_rows(tiny_run, teacher_rows, tmp_path):
    out = select_stage.run(SelectConfig(by="confident", require_correct=True, threshold=0.0), tiny_run["tdata"],
                           tmp_path / "sel", progress=False)  # fmt: skip
    table, manifest = _selected(out)
    rows = teacher_rows
    split = np.asarray(table.column("split").to_pylist())
    train_ids = sorted(np.asarray(table.column("id").to_pylist())[split == "train"].tolist())
    expected = sorted(rows["id"][(rows["split"] == "train") & (rows["pred"] == rows["label"])].tolist())
    assert train_ids == expected and 0 < len(expected) < 60
    assert set(np.asarray(table.column("reason").to_pylist())[split == "train"]) == {"teacher-correct"}
    by_id = dict(zip(rows["id"].tolist(), rows["conf"].tolist(), strict=True))
    weights = table.column("weight").to_numpy()[split == "train"]
    ids = np.asarray(table.column("id").to_pylist())[split == "train"]
    np.testing.assert_allclose(weights, [by_id[i] for i in ids], rtol=1e-5)
    _check_passthrough(table, rows)
    _check_stats(table, manifest)
    assert manifest["selection"]["train"] == {"kept": len(expected), "rows": 60, "share": pytest.approx(len(expected) / 60)}


@pytest.mark.parametrize("require_correct", [False, True])
def test_confident_threshold_keeps_rows_at_or_above_it(tiny_run, teacher_rows, tmp_path, require_correct):
    rows = teacher_rows
    train = rows["split"] == "train"
    threshold = float(np.round(np.median(rows["conf"][train]), 3))
    out = select_stage.run(SelectConfig(by="confident", require_correct=require_correct, threshold=threshold),
                           tiny_run["tdata"], tmp_path / "sel", progress=False)  # fmt: skip
    table, manifest = _selected(out)
    split = np.asarray(table.column("split").to_pylist())
    keep = train & (rows["conf"] >= threshold)
    if require_correct:
        keep &= rows["pred"] == rows["label"]
    got = sorted(np.asarray(table.column("id").to_pylist())[split == "train"].tolist())
    assert got == sorted(rows["id"][keep].tolist())
    reasons = set(np.asarray(table.column("reason").to_pylist())[split == "train"])
    assert all(r.endswith(f";p>={threshold:g}") for r in reasons), reasons
    _check_passthrough(table, rows)
    _check_stats(table, manifest)


def test_selecting_dev_too_filters_dev_and_still_passes_test(tiny_run, teacher_rows, tmp_path):
    rows = teacher_rows
    out = select_stage.run(SelectConfig(splits=["train", "dev"]), tiny_run["tdata"], tmp_path / "sel", progress=False)
    table, manifest = _selected(out)
    split = np.asarray(table.column("split").to_pylist())
    correct = rows["pred"] == rows["label"]
    assert (split == "dev").sum() == (correct & (rows["split"] == "dev")).sum()
    _check_passthrough(table, rows, splits=("test",))
    _check_stats(table, manifest)


def test_an_impossible_threshold_raises_and_leaves_no_output(tiny_run, teacher_rows, tmp_path):
    top = teacher_rows["conf"][teacher_rows["split"] == "train"].max()
    if top >= 1.0:
        pytest.skip("a train row has confidence 1.0")
    out = tmp_path / "sel"
    with pytest.raises(DistilError, match=r"selection 'confident' kept no rows of \['train'\]; lower the threshold"):
        select_stage.run(SelectConfig(require_correct=False, threshold=1.0), tiny_run["tdata"], out, progress=False)
    assert not out.exists() and not (tmp_path / "sel.partial").exists()
    with pytest.raises(DistilError, match="kept no rows"):
        select_stage.run(SelectConfig(splits=["nosuchsplit"]), tiny_run["tdata"], out, progress=False)
    assert not out.exists() and not (tmp_path / "sel.partial").exists()


@pytest.mark.parametrize(
    "cfg, match",
    [
        (SelectConfig(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (SelectConfig(by="majority"), "unknown selection 'majority'; choose one of confident"),
        (SelectConfig(min_agreement=0.5), "setting 'min_agreement' is for language-model selections"),
    ],
)
def test_classifier_selection_bad_settings(tiny_run, tmp_path, cfg, match):
    out = tmp_path / "sel"
    with pytest.raises(DistilError, match=match):
        select_stage.run(cfg, tiny_run["tdata"], out, progress=False)
    assert not out.exists() and not (tmp_path / "sel.partial").exists()


def test_classifier_selection_refuses_a_student(tiny_run, tmp_path):
    with pytest.raises(DistilError, match="--student is used by --by uncertain"):
        select_stage.run(SelectConfig(), tiny_run["tdata"], tmp_path / "sel", student=tiny_run["teacher"], progress=False)


def test_a_rerun_replaces_the_selection(tiny_run, tmp_path):
    out = tmp_path / "sel"
    select_stage.run(SelectConfig(require_correct=False), tiny_run["tdata"], out, progress=False)
    everything = pq.read_table(out).num_rows
    assert everything == 180
    select_stage.run(SelectConfig(require_correct=True), tiny_run["tdata"], out, progress=False)
    assert pq.read_table(out).num_rows < everything
    assert not (tmp_path / "sel.partial").exists()


# ---- LM selection on a hand-written LM teacher-data table -------------------------------

# prompt_id -> (split, answers of its samples); None = no parsed answer
PROMPTS = {
    0: ("train", ["5", "5", "5", "7"]),
    1: ("train", ["2", "3", None, "2"]),
    2: ("train", [None, None]),
    3: ("train", ["4", "4 ", "4.", "4"]),  # normalised: all "4"
    4: ("dev", ["1", "9"]),
    5: ("test", ["6"]),
}


def _lm_rows():
    rows, i = [], 0
    for pid, (split, answers) in PROMPTS.items():
        for s, answer in enumerate(answers):
            rows.append({
                "id": i, "prompt_id": pid, "sample": s, "teacher": 0, "split": split, "task": "chain_sum", "item": pid,
                "prompt": f"prompt {pid} =", "gold": "5", "completion": f" {answer or '?'} sample{s}", "answer": answer,
                "parse": "ok" if answer is not None else "no number", "score": 1.0 if answer == "5" else 0.0,
                "seq_logprob": -0.5 * (s + 1), "token_ids": [3, 4, 5][: s % 3 + 1],
                "topk_ids": [1, 2] * (s % 3 + 1), "topk_logprobs": [-0.1, -2.0] * (s % 3 + 1), "topk_codes": None, "topk_tail": None,
                "expert_ids": [], "expert_weights": [], "messages": None, "finish_reason": "stop", "prompt_tokens": 3,
                "completion_tokens": s % 3 + 1,
            })  # fmt: skip
            i += 1
    return rows


@pytest.fixture(scope="module")
def lm_tdata(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm") / "lm_tdata"
    d.mkdir()
    rows = _lm_rows()
    columns = {name: [r[name] for r in rows] for name in LM_TEACHER_DATA.names}
    columns["topk_logprobs"] = [np.asarray(v, np.float16) for v in columns["topk_logprobs"]]
    columns["expert_weights"] = [np.asarray(v, np.float16) for v in columns["expert_weights"]]
    columns["expert_ids"] = [np.asarray(v, np.uint8) for v in columns["expert_ids"]]
    TableWriter(d, LM_TEACHER_DATA).write(pa.Table.from_pydict(columns, schema=LM_TEACHER_DATA))
    write_manifest(d, kind=Kind.LM_TEACHER_DATA, params={}, inputs={}, rows=len(rows),
                   extra={"task": {"name": "chain_sum"}, "top_k": 2, "teachers": []})  # fmt: skip
    return d


def _lm_selected(out):
    table = pq.read_table(out)
    assert table.schema.names == LM_SELECTION.names
    return table, json.loads((out / MANIFEST).read_text())


def test_lm_majority_keeps_the_majority_samples_weighted_by_their_share(lm_tdata, tmp_path):
    out = select_stage.run(SelectConfig(by="majority"), lm_tdata, tmp_path / "sel", progress=False)
    table, manifest = _lm_selected(out)
    kept = {(r["prompt_id"], r["sample"]): (r["weight"], r["reason"]) for r in table.to_pylist()}
    expected = {
        (0, 0): 0.75, (0, 1): 0.75, (0, 2): 0.75,  # 3 of 4 say 5; the 7 is dropped
        (1, 0): 0.5, (1, 3): 0.5,  # 2 of 4 say 2; the unparsed sample counts in the share
        (3, 0): 1.0, (3, 1): 1.0, (3, 2): 1.0, (3, 3): 1.0,  # "4 ", "4." and "4" agree once normalised
        (4, 0): 1.0, (4, 1): 1.0, (5, 0): 1.0,  # dev and test pass through
    }  # fmt: skip
    assert set(kept) == set(expected)
    for key, weight in expected.items():
        assert kept[key][0] == pytest.approx(weight), key
    assert kept[(0, 0)][1] == "majority 3/4" and kept[(1, 3)][1] == "majority 2/4"
    assert {kept[k][1] for k in [(4, 0), (4, 1), (5, 0)]} == {"passthrough"}
    assert manifest["kind"] == Kind.LM_SELECTION and manifest["rows"] == 12 and manifest["top_k"] == 2
    assert manifest["selection"] == {
        "train": {"kept": 9, "rows": 14, "share": pytest.approx(9 / 14)},
        "dev": {"kept": 2, "rows": 2, "share": 1.0},
        "test": {"kept": 1, "rows": 1, "share": 1.0},
    }


def test_lm_majority_min_agreement_drops_split_prompts(lm_tdata, tmp_path):
    out = select_stage.run(SelectConfig(by="majority", min_agreement=0.6), lm_tdata, tmp_path / "sel", progress=False)
    table, manifest = _lm_selected(out)
    train = [r["prompt_id"] for r in table.to_pylist() if r["split"] == "train"]
    assert sorted(set(train)) == [0, 3] and len(train) == 7
    assert manifest["selection"]["train"]["kept"] == 7


def test_lm_chained_majority_dedup_and_correct(lm_tdata, tmp_path):
    out = select_stage.run(SelectConfig(by="correct"), lm_tdata, tmp_path / "c", progress=False)
    table, _ = _lm_selected(out)
    train = [(r["prompt_id"], r["sample"]) for r in table.to_pylist() if r["split"] == "train"]
    assert sorted(train) == [(0, 0), (0, 1), (0, 2)]  # score 1 where the answer is the gold 5
    out = select_stage.run(SelectConfig(by="majority+length", min_tokens=2), lm_tdata, tmp_path / "ml", progress=False)
    table, _ = _lm_selected(out)
    rows = [r for r in table.to_pylist() if r["split"] == "train"]
    assert all(len(r["token_ids"]) >= 2 for r in rows)
    assert sorted((r["prompt_id"], r["sample"]) for r in rows) == [(0, 1), (0, 2), (3, 1), (3, 2)]
    assert {r["reason"] for r in rows} == {"length ok"}  # the last judge's reason
    assert {round(r["weight"], 4) for r in rows if r["prompt_id"] == 0} == {0.75}


def test_lm_selection_nothing_kept_raises_and_leaves_no_output(lm_tdata, tmp_path):
    out = tmp_path / "sel"
    with pytest.raises(DistilError, match=r"kept no rows of \['train'\]"):
        select_stage.run(SelectConfig(by="majority", min_agreement=1.01), lm_tdata, out, progress=False)
    assert not out.exists() and not (tmp_path / "sel.partial").exists()


@pytest.mark.parametrize(
    "cfg, match",
    [
        (SelectConfig(by="confident"), "unknown selection 'confident' for LM teacher data"),
        (SelectConfig(by="majority+nope"), "unknown selection 'majority\\+nope'"),
        (SelectConfig(by="majority", threshold=0.5), "setting 'threshold' is for classifier selections, not language-model"),
        (SelectConfig(by="majority", require_correct=False), "setting 'require_correct' is for classifier selections"),
    ],
)
def test_lm_selection_bad_settings(lm_tdata, tmp_path, cfg, match):
    out = tmp_path / "sel"
    with pytest.raises(DistilError, match=match):
        select_stage.run(cfg, lm_tdata, out, progress=False)
    assert not out.exists() and not (tmp_path / "sel.partial").exists()
