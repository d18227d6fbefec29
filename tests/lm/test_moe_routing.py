"""MoE routing: the recorder, the routing metrics (load, top-1 repeat, SRP, SCH) on
hand-made routings with known answers, routing in LM teacher data, and routing metrics in
`distil evaluate`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.lm.moe.metrics import expert_load, load_entropy, routing_metrics, sch, srp, top1_repeat

# ---- routing metrics on hand-made routings -----------------------------------------------


def _constant(tokens: int, layers: int = 2, experts: tuple[int, ...] = (1, 3)) -> np.ndarray:
    return np.tile(np.asarray(experts), (tokens, layers, 1))


def _round_robin(tokens: int, experts: int, layers: int = 1) -> np.ndarray:
    """k = 1, token t -> expert t mod E: perfectly balanced, never twice in a row."""
    return np.tile((np.arange(tokens) % experts)[:, None, None], (1, layers, 1))


def test_constant_routing_is_perfectly_local():
    seqs = [_constant(40), _constant(17)]
    summary, table, load = routing_metrics(seqs, 4, segment=16)
    assert summary["routing_top1_repeat"] == 1.0
    assert summary["routing_srp"] == pytest.approx(1.0) and summary["routing_sch"] == pytest.approx(1.0)
    assert [r["srp"] for r in table] == pytest.approx([1.0, 1.0])
    np.testing.assert_allclose(load, [[0, 0.5, 0, 0.5]] * 2)  # two of four experts, evenly
    assert summary["routing_load_entropy"] == pytest.approx(0.5)  # ln 2 / ln 4
    assert summary["routing_tokens"] == 57 and summary["routing_cache"] == 4  # default C = 2 x k


def test_round_robin_routing_known_values():
    e, m, n = 4, 4, 40
    seqs = [_round_robin(n, e)]
    ent, nats = load_entropy(expert_load(seqs, e))
    assert ent == pytest.approx([1.0]) and nats == pytest.approx([np.log(4)])  # uniform load: entropy 1
    assert top1_repeat(seqs, e) == pytest.approx([0.0])
    # every window of 4 holds each expert once: best segment routing is "all four", F1 = 2*4/(16+4)
    per_layer, model = srp(seqs, e, m)
    assert per_layer == pytest.approx([0.4]) and model == pytest.approx(0.4)
    # C = 2 with no look-ahead beyond the current token: evicts the least recent (LRU), which on
    # a cycle of 4 always drops the next one needed: only the two cold slots "hit"
    assert sch(seqs, e, segment=1, cache=2) == pytest.approx([2 / n])
    # a cache holding every expert misses nothing
    assert sch(seqs, e, segment=m, cache=e) == pytest.approx([1.0])


def test_sch_keeps_the_expert_needed_again():
    """A B A C A D ... (k = 1, C = 2): A has the most uses in every look-ahead window, so the
    other cached expert is the one evicted and every A after the first hits."""
    seq = np.array([0, 1, 0, 2, 0, 3, 0, 1, 0, 2, 0, 3])[:, None, None]
    rate = sch([seq], 4, segment=4, cache=2)[0]
    assert rate == pytest.approx((2 + 5) / 12)  # 2 cold slots (A, B) + the 5 later As


def test_srp_skips_sequences_shorter_than_the_segment():
    short, long = _round_robin(5, 4, layers=2), _round_robin(32, 4, layers=2)
    assert np.isnan(srp([short], 4, 16)[1])
    assert srp([short, long], 4, 16)[1] == pytest.approx(srp([long], 4, 16)[1])


def test_top1_follows_weights_when_given():
    ids = np.array([[[0, 1]], [[1, 0]], [[0, 1]]])  # rank order flips every token
    w = np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.7, 0.3]]])  # but expert 0 always weighs most
    assert top1_repeat([ids], 2) == pytest.approx([0.0])
    assert top1_repeat([ids], 2, [w]) == pytest.approx([1.0])


# ---- the recorder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mixtral():
    from stages.lm.models import LMSize, build_lm, train_tokenizer

    tok = train_tokenizer(["12+7=19 and 3+4=7; what is 5+5? 10"] * 40, 300)
    model = build_lm("mixtral", LMSize(hidden=32, layers=2, heads=2, experts=4, experts_per_token=2, context=64), tok)
    return model.eval(), tok


@pytest.mark.parametrize("samples,temperature", [(1, 0.0), (3, 1.0)])
def test_recorder_rows_align_with_generated_tokens(tiny_mixtral, samples, temperature):
    from stages.lm.generation import sample

    model, tok = tiny_mixtral
    prompts = ["12+7=", "what is 5+5? and 3+4", "3"]  # different lengths: left padding in the prefill
    torch.manual_seed(0)
    rows = sample(model, tok, prompts, samples=samples, temperature=temperature, top_p=1.0, max_new_tokens=5, top_k=0,
                  device="cpu", routing=True, prompt_routing=True)  # fmt: skip
    assert len(rows) == 3 * samples
    for i, r in enumerate(rows):
        n = len(r["token_ids"])
        ids, w = np.asarray(r["expert_ids"]), np.asarray(r["expert_weights"], np.float32)
        assert ids.shape == (n * 2 * 2,) and w.shape == ids.shape and r["expert_weights"].dtype == np.float16
        assert ids.min() >= 0 and ids.max() < 4
        per_token = ids.reshape(n, 2, 2)
        assert (per_token[..., 0] != per_token[..., 1]).all()  # top-2: two distinct experts
        np.testing.assert_allclose(w.reshape(n, 2, 2).sum(-1), 1.0, atol=2e-3)  # mixtral renormalises its top-k
        prompt_len = len(tok(prompts[i // samples], add_special_tokens=False)["input_ids"])
        assert len(r["prompt_expert_ids"]) == (prompt_len - 1) * 2 * 2
    # the recorded routing is the model's own: a plain forward over prompt + completion routes the same
    from stages.lm.moe.routing import RouterRecorder

    r, prompt = rows[0], prompts[0]
    full = tok(prompt, add_special_tokens=False)["input_ids"] + r["token_ids"]
    with RouterRecorder(model) as rec, torch.no_grad():
        model(input_ids=torch.tensor([full[:-1]]))
    ids, _ = rec.call_arrays(0)
    stored = np.concatenate([r["prompt_expert_ids"], r["expert_ids"]]).reshape(-1, 2, 2)
    np.testing.assert_array_equal(np.sort(ids[0], -1), np.sort(stored, -1))


def test_scmoe_weak_passes_are_not_recorded(tiny_mixtral):
    """SCMoE runs an extra weak forward per step inside generate; with beta = 0 it picks the
    model's own tokens, so the recorded routing must be exactly plain greedy's."""
    from stages.lm.generation import sample
    from stages.lm.moe.scmoe import SCMoE

    model, tok = tiny_mixtral
    kw = dict(samples=1, temperature=0.0, top_p=1.0, max_new_tokens=4, top_k=0, device="cpu", routing=True, prompt_routing=True)
    plain = sample(model, tok, ["12+7=", "what is 5+5?"], **kw)
    contrast = sample(model, tok, ["12+7=", "what is 5+5?"], decode=SCMoE(beta=0.0), **kw)
    for a, b in zip(plain, contrast, strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["expert_ids"] == b["expert_ids"] and a["prompt_expert_ids"] == b["prompt_expert_ids"]


def test_recorder_pauses_and_cleans_up(tiny_mixtral):
    from stages.lm.moe.routing import RouterRecorder, paused

    model, _ = tiny_mixtral
    x = torch.tensor([[5, 6, 7]])
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with RouterRecorder(model) as rec, torch.no_grad():
        model(input_ids=x)
        with paused(model):  # what SCMoE's weak passes run under
            model(input_ids=x)
        with rec.paused():
            model(input_ids=x)
        model(input_ids=x[:, :1])
    assert len(rec.calls) == 2 and rec.call_arrays(1)[0].shape == (1, 1, 2, 2)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with paused(model):  # no recorder: a no-op
        pass


def test_recorder_refuses_dense_models():
    from stages.errors import DistilError
    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.lm.moe.routing import RouterRecorder

    tok = train_tokenizer(["1+1=2"] * 20, 300)
    with pytest.raises(DistilError, match="without a router"):
        RouterRecorder(build_lm("llama", LMSize(hidden=16, layers=1, heads=2), tok))


# ---- through the CLI -------------------------------------------------------------------------

LM = ["--set", "data.sizes=[40,8,8]", "--set", "lm.hidden=32", "--set", "lm.layers=2", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "--set", "epochs=1", "-q"]  # fmt: skip
GEN = ["--set", "data.sizes=[40,8,8]", "--set", "samples=2", "--set", "temperature=1.0", "--set", "top_k=4",
       "--set", "max_new_tokens=4", "--set", "shard_prompts=32", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("moe")
    c = Cli(write_params(root))
    c.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "moe", *LM,
         "--set", "lm.family=mixtral", "--set", "lm.experts=4", "--set", "lm.experts_per_token=2")  # fmt: skip
    c.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "dense", *LM, "--set", "lm.layers=1")
    return root


def test_generate_teacher_data_stores_moe_routing(cli, moe_teacher, tmp_path):
    cli.ok(
        "generate-teacher-data", "--teacher", moe_teacher / "moe", "--data", "basic_arithmetic", "--out", tmp_path / "td", *GEN
    )
    manifest = json.loads((tmp_path / "td" / ".manifest.json").read_text())
    assert manifest["routing"] == {"layers": 2, "experts": 4, "experts_per_token": 2}
    table = pq.read_table(tmp_path / "td")
    assert str(table.schema.field("expert_ids").type) == "list<element: uint8>"
    assert str(table.schema.field("expert_weights").type) == "list<element: halffloat>"
    for row in table.slice(0, 12).to_pylist():
        n = len(row["token_ids"])
        assert len(row["expert_ids"]) == len(row["expert_weights"]) == n * 2 * 2 and max(row["expert_ids"]) < 4
        assert np.allclose(np.asarray(row["expert_weights"]).reshape(n, 2, 2).sum(-1), 1.0, atol=2e-3)
    # routing: off stores none from an MoE teacher; a dense teacher under the default (auto) none either
    for teacher, extra in (("moe", ["--set", "routing=off"]), ("dense", [])):
        out = tmp_path / f"{teacher}-none"
        cli.ok(
            "generate-teacher-data", "--teacher", moe_teacher / teacher, "--data", "basic_arithmetic", "--out", out, *GEN, *extra
        )
        stored = pq.read_table(out, columns=["expert_ids", "expert_weights"]).to_pylist()
        assert all(r["expert_ids"] == [] and r["expert_weights"] == [] for r in stored)
        assert "routing" not in json.loads((out / ".manifest.json").read_text())


def test_routing_on_with_a_dense_teacher_is_one_clean_error(cli, moe_teacher, tmp_path):
    cli.fails("generate-teacher-data", "--teacher", moe_teacher / "dense", "--data", "basic_arithmetic", "--out", tmp_path / "td",
              *GEN, "--set", "routing=on", match="router data requested from a model without a router")  # fmt: skip
    assert not (tmp_path / "td").exists() and not (tmp_path / "td.partial").exists()
    cli.fails("generate-teacher-data", "--teacher", moe_teacher / "moe", "--data", "basic_arithmetic", "--out", tmp_path / "td",
              *GEN, "--set", "routing=maybe", match="routing must be auto, on or off")  # fmt: skip
    assert not (tmp_path / "td").exists() and not (tmp_path / "td.partial").exists()


def test_old_teacher_data_without_routing_columns_stays_readable(tmp_path):
    import pyarrow as pa

    from stages.artifacts import LM_TEACHER_DATA, read_table

    old = pa.schema([f for f in LM_TEACHER_DATA if f.name not in ("expert_ids", "expert_weights", "teacher")])
    row = {"id": 0, "prompt_id": 0, "sample": 0, "split": "train", "task": "t", "item": 0, "prompt": "1+1=", "gold": "2",
           "completion": "2", "answer": "2", "parse": "ok", "score": 1.0, "seq_logprob": -0.1, "token_ids": [5],
           "topk_ids": [], "topk_logprobs": []}  # fmt: skip
    (tmp_path / "td").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "td" / "part-00000.parquet")
    table, _ = read_table(tmp_path / "td", LM_TEACHER_DATA, "LM teacher data")
    assert table.column("expert_ids").to_pylist() == [None] and table.column("expert_weights").to_pylist() == [None]


def test_evaluate_adds_routing_metrics_for_moe_models_only(cli, moe_teacher, tmp_path):
    cli.ok("evaluate", "--model", moe_teacher / "moe", "--model", moe_teacher / "dense", "--data", "basic_arithmetic",
           "--out", tmp_path / "ev", "--set", "data.sizes=[40,8,8]", "--set", "max_new_tokens=4", "--set", "routing_segment=4")  # fmt: skip
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    moe, dense = metrics["moe"], metrics["dense"]
    for key in ("routing_load_entropy", "routing_srp", "routing_sch", "routing_top1_repeat"):
        assert 0.0 <= moe[key] <= 1.0, key
    assert moe["routing_segment"] == 4 and moe["routing_cache"] == 4 and moe["routing_tokens"] > 8 * 4
    assert not any(k.startswith("routing_") for k in dense)
    with open(tmp_path / "ev" / "routing_layers.csv") as fh:
        layers = list(csv.DictReader(fh))
    assert [(r["model"], r["layer"]) for r in layers] == [("moe", "0"), ("moe", "1")]
    assert {"load_entropy", "top1_repeat", "srp", "sch"} <= set(layers[0])
    with open(tmp_path / "ev" / "plots" / "moe" / "routing_load.csv") as fh:
        load = list(csv.DictReader(fh))
    assert len(load) == 2 * 4 and sum(float(r["load"]) for r in load if r["layer"] == "0") == pytest.approx(1.0)
    assert not (tmp_path / "ev" / "plots" / "dense").exists()


def test_a_dense_student_distils_from_moe_teacher_data(cli, moe_teacher, tmp_path):
    """Token-level KD from an MoE teacher's stored top-k: the student is dense, shares the
    teacher's vocabulary, and its loss on the teacher's dev samples falls."""
    cli.ok(
        "generate-teacher-data", "--teacher", moe_teacher / "moe", "--data", "basic_arithmetic", "--out", tmp_path / "td", *GEN
    )
    cli.ok("distill", "--method", "kd", "--data", tmp_path / "td", "--out", tmp_path / "s", *LM, "--set", "lm.layers=1",
           "--set", "epochs=4", "--set", "checkpoint=last")  # fmt: skip
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["model_type"] == "llama" and "num_local_experts" not in config
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert history[-1]["dev_loss"] < history[0]["dev_loss"]
