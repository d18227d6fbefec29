"""SCMoE decoding (stages/lm/moe/scmoe.py): the contrast and its plausibility cut-off, weak routing
as a genuine single-expert computation, the weak pass's own KV cache under left padding,
b = 0 reproducing greedy decoding, and the `--decode scmoe` CLI on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.artifacts import read_manifest
from stages.lm.generation import generate, sample
from stages.lm.models import LMSize, build_lm, routers, train_tokenizer
from stages.lm.moe.scmoe import SCMoE, SCMoELogitsProcessor, contrast, weak_routing
from stages.lm.topk_codec import TopKFormat

TEXT = ["Question: Calculate 2 - -1.\nAnswer: 3", "Question: What is 17 + 25?\nAnswer: 42", "compute 3 * 4 = 12"] * 10
SIZE = LMSize(hidden=32, layers=2, heads=2, intermediate=48, experts=4, experts_per_token=2, context=64)
PROMPTS = ["Question: What is 1", "Question: Calculate 2 - -1.\nAnswer:", "3 *", "Question: What is 17 + 25?"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 300)


def _moe(family: str, tok, seed: int = 0):
    model = build_lm(family, SIZE, tok, seed=seed).eval()
    with torch.no_grad():  # sharper, untied router preferences than the init's, so ranks are never tied
        for r in routers(model):
            r.weight.normal_(0, 1.0)
    return model


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# --- the contrast -------------------------------------------------------------------------


def test_contrast_is_the_paper_formula_on_the_plausible_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.04, 0.16]])
    strong = probs.log() + 3.0  # logits: any shift gives the same plausible set
    weak = torch.tensor([[0.0, 5.0, -100.0, 1.0]])  # a weak model that would push token 2 to the top
    out = contrast(strong, weak, beta=0.5, alpha=0.1)
    keep = torch.tensor([True, True, False, True])  # p >= 0.1 * 0.5 keeps 0.5, 0.3 and 0.16; 0.04 is cut
    assert torch.equal(out[0, keep], (1.5 * strong - 0.5 * weak)[0, keep])
    assert out[0, 2] == float("-inf")  # an implausible token stays out however the weak model scores it
    assert out.argmax(-1).item() == 0  # 1.5*(log .5+3) - 0 beats 1.5*(log .3+3) - 2.5
    flipped = contrast(strong, torch.tensor([[5.0, 0.0, 0.0, 0.0]]), beta=0.5, alpha=0.1)
    assert flipped.argmax(-1).item() == 1  # what the weak model also likes is penalised: the runner-up wins


def test_plausibility_cut_off_follows_alpha():
    strong = torch.randn(5, 50) * 3
    weak = torch.randn(5, 50) * 3
    lp = strong.log_softmax(-1)
    for alpha in (1.0, 0.5, 0.1, 1e-6):
        out = contrast(strong, weak, beta=0.5, alpha=alpha)
        expect = lp >= lp.max(-1, keepdim=True).values + math.log(alpha)
        assert torch.equal(torch.isfinite(out), expect)
        assert torch.isfinite(out.gather(-1, strong.argmax(-1, keepdim=True))).all()  # the strong argmax always survives
    only_top = contrast(strong, weak, beta=0.5, alpha=1.0)
    assert (torch.isfinite(only_top).sum(-1) == 1).all()  # alpha = 1: greedy on the strong model


def test_beta_zero_leaves_the_strong_logits_untouched():
    strong, weak = torch.randn(3, 40), torch.randn(3, 40)
    out = contrast(strong, weak, beta=0.0, alpha=0.1)
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], strong[kept]) and torch.equal(out.argmax(-1), strong.argmax(-1))


# --- weak routing -------------------------------------------------------------------------


def _single_expert(experts, h: torch.Tensor, e: int) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(h, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])  # experts kernels; GPU decoding uses batched_mm
def test_weak_routing_is_a_genuine_single_expert_computation(tok, family, impl):
    model = _moe(family, tok)
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    h = torch.randn(1, 7, SIZE.hidden)
    flat = h.reshape(-1, SIZE.hidden)
    with torch.no_grad():
        normal = block(h)
        order = block.gate(flat)[0].float().softmax(-1).argsort(dim=-1, descending=True)  # experts by router probability
        for rank in (1, 2, SIZE.experts):
            with weak_routing(model, rank):
                weak = block(h)
            expect = []
            for t in range(flat.shape[0]):
                y = _single_expert(block.experts, flat[t], int(order[t, rank - 1]))  # that one expert, weight 1
                if family == "qwen2_moe":  # the always-on shared expert is not routed and stays
                    y = y + torch.sigmoid(block.shared_expert_gate(flat[t])) * block.shared_expert(flat[t])
                expect.append(y)
            assert torch.allclose(weak.reshape(-1, SIZE.hidden), torch.stack(expect), atol=1e-5), rank
            assert not torch.allclose(weak, normal, atol=1e-4)
        assert torch.equal(block(h), normal)  # the hooks are gone after the block
    assert all(not r._forward_hooks for r in routers(model))


# --- generation ---------------------------------------------------------------------------


def _ids(rows):
    return [r["token_ids"] for r in rows]


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_beta_zero_reproduces_greedy_decoding_exactly(tok, family):
    model = _moe(family, tok)
    greedy = sample(model, tok, PROMPTS, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=10, top_k=5, device="cpu")
    scmoe = sample(model, tok, PROMPTS, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=10, top_k=5, device="cpu",
                   decode=SCMoE(beta=0.0, alpha=0.1, weak_rank=2))  # fmt: skip
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # left padding of four lengths
    assert _ids(scmoe) == _ids(greedy) and all(len(i) == 10 or i[-1] == tok.eos_token_id for i in _ids(greedy))
    assert [r["topk_ids"] for r in scmoe] == [r["topk_ids"] for r in greedy]
    texts = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3, device="cpu", decode=SCMoE(beta=0.0))
    assert texts == generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3, device="cpu")


def test_recorded_routing_skips_the_weak_passes(tok):
    model = _moe("mixtral", tok)
    kw = dict(samples=1, temperature=0.0, top_p=1.0, max_new_tokens=6, top_k=0, device="cpu", routing=True, prompt_routing=True)
    greedy = sample(model, tok, PROMPTS, **kw)
    scmoe = sample(model, tok, PROMPTS, decode=SCMoE(beta=0.0), **kw)
    for a, b in zip(greedy, scmoe, strict=True):  # same tokens, and only the strong passes' routing was kept
        assert a["token_ids"] == b["token_ids"] and a["expert_ids"] == b["expert_ids"]
        assert a["prompt_expert_ids"] == b["prompt_expert_ids"]


def _run_with_processor(model, tok, prompts, beta, *, samples=1, **kw):
    """model.generate with one SCMoE processor whose weak logits and outputs are kept per step."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    proc = SCMoELogitsProcessor(model, enc["attention_mask"], beta=beta, alpha=0.1, weak_rank=2)
    weak, inner = [], proc._weak

    def keep_weak(ids):
        weak.append(inner(ids))
        return weak[-1]

    proc._weak = keep_weak
    out = model.generate(**enc, max_new_tokens=6, num_return_sequences=samples, output_logits=True, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         logits_processor=[proc], **kw)  # fmt: skip
    return enc, out, weak


def test_weak_pass_cache_matches_a_full_recompute_under_left_padding(tok):
    model = _moe("mixtral", tok)
    torch.manual_seed(0)  # two samples per prompt: the processor repeats the prompt mask as generate does
    enc, out, weak = _run_with_processor(model, tok, PROMPTS, beta=0.5, samples=2, do_sample=True, top_k=0)
    seqs = out.sequences
    mask = torch.cat([enc["attention_mask"].repeat_interleave(2, 0), torch.ones(seqs.shape[0], seqs.shape[1] - enc["input_ids"].shape[1],
                     dtype=torch.long)], dim=1)  # fmt: skip
    with torch.no_grad(), weak_routing(model, 2):
        full = model(input_ids=seqs, attention_mask=mask, position_ids=_positions(mask)).logits
        unmasked = model(input_ids=seqs).logits  # a weak pass that attended to the padding would look like this
    start = enc["input_ids"].shape[1] - 1
    assert len(weak) == len(out.logits)
    for t, w in enumerate(weak):
        assert torch.allclose(w, full[:, start + t].float(), atol=1e-4), t
    assert not torch.allclose(torch.stack(weak, 1), unmasked[:, start : start + len(weak)].float(), atol=1e-3)
    assert not torch.allclose(weak[0], out.logits[0], atol=1e-3)  # the weak activation is another model


def test_positive_beta_changes_the_scores_by_the_formula(tok):
    model = _moe("mixtral", tok)
    enc, out, weak = _run_with_processor(model, tok, PROMPTS, beta=0.5, do_sample=False)
    for t, (z, w, s) in enumerate(zip(out.logits, weak, out.scores, strict=True)):
        kept = torch.isfinite(s)
        assert torch.equal(kept, torch.isfinite(contrast(z, w, 0.5, 0.1)))
        assert torch.allclose(s[kept], (1.5 * z - 0.5 * w)[kept])
        assert not torch.allclose(s[kept], z[kept], atol=1e-3), t  # b > 0 moves the scores off the strong logits
        assert torch.equal(out.sequences[:, enc["input_ids"].shape[1] + t], s.argmax(-1))  # greedy on the SCMoE scores


def test_sampling_draws_from_the_contrast_over_the_temperature(tok):
    model = _moe("mixtral", tok)
    torch.manual_seed(0)
    _, out, weak = _run_with_processor(model, tok, PROMPTS, beta=0.5, do_sample=True, temperature=0.5, top_k=0, top_p=1.0)
    for z, w, s in zip(out.logits, weak, out.scores, strict=True):
        c = contrast(z, w, 0.5, 0.1)
        assert torch.equal(torch.isfinite(s), torch.isfinite(c))
        assert torch.allclose(s[torch.isfinite(s)], (c / 0.5)[torch.isfinite(c)])  # temperature after the contrast
    rows = sample(model, tok, PROMPTS, samples=3, temperature=0.7, top_p=1.0, max_new_tokens=5, top_k=4, device="cpu",
                  decode=SCMoE())  # fmt: skip
    assert len(rows) == 3 * len(PROMPTS) and all(len(r["topk_ids"]) == 4 * len(r["token_ids"]) for r in rows)


# --- the CLI ------------------------------------------------------------------------------

DATA = ["--data", "basic_arithmetic", "--set", "data.sizes=[20,4,6]", "-q"]
EV = [*DATA, "--set", "max_new_tokens=5"]
GEN = [*DATA, "--set", "splits=test", "--set", "samples=1", "--set", "temperature=0", "--set", "top_k=4",
       "--set", "max_new_tokens=5"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("scmoe")
    for name, family in (("moe", "mixtral"), ("dense", "llama")):
        model = _moe(family, tok) if family == "mixtral" else build_lm(family, SIZE, tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_evaluate_reports_scmoe_accuracy_and_records_decode(cli, models, tmp_path):
    cli.ok("evaluate", "--model", models / "moe", "--out", tmp_path / "g", *EV)
    cli.ok("evaluate", "--model", models / "moe", "--out", tmp_path / "s", "--decode", "scmoe", *EV)
    cli.ok("evaluate", "--model", models / "moe", "--out", tmp_path / "z", "--decode", "scmoe", "--set", "scmoe_beta=0", *EV)
    g, s, z = (json.loads((tmp_path / d / "metrics.json").read_text())["moe"] for d in "gsz")
    assert g["decode"] == "greedy" and s["decode"] == "scmoe" and z["decode"] == "scmoe"
    assert 0 <= s["accuracy"] <= 1 and s["rows"] == g["rows"] == 6
    assert (s["scmoe_beta"], s["scmoe_alpha"], s["scmoe_weak_rank"]) == (0.5, 0.1, 2) and z["scmoe_beta"] == 0
    assert z["accuracy"] == g["accuracy"] and z["unparsed_share"] == g["unparsed_share"]


def test_generate_teacher_data_scmoe_keeps_the_strong_top_k(cli, models, tmp_path):
    import pyarrow.parquet as pq

    moe = models / "moe"
    cli.ok("generate-teacher-data", "--teacher", moe, "--out", tmp_path / "g", *GEN)
    cli.ok("generate-teacher-data", "--teacher", moe, "--out", tmp_path / "z", "--decode", "scmoe", "--set", "scmoe_beta=0", *GEN)
    cli.ok("generate-teacher-data", "--teacher", moe, "--out", tmp_path / "s", "--decode", "scmoe", "--set", "scmoe_beta=3", *GEN)
    g, z, s = (pq.read_table(tmp_path / d).to_pylist() for d in "gzs")
    assert [r["token_ids"] for r in z] == [r["token_ids"] for r in g]
    assert json.loads((tmp_path / "s" / ".manifest.json").read_text())["decode"] == "scmoe"
    from stages.lm.models import load_lm

    model, tk = load_lm(moe)
    for row, ref in zip(s, g, strict=True):
        assert row["topk_ids"][:4] == ref["topk_ids"][:4]  # step 0: the same prompt, the same strong distribution
        prompt = tk(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + row["token_ids"]])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(row["token_ids"])].log_softmax(-1)
        top = lp.topk(4, dim=-1)
        assert row["topk_ids"] == top.indices.flatten().tolist()  # the normal routing's top-k, step by step
        stored = TopKFormat.of(read_manifest(tmp_path / "s")).row(row)[1].reshape(-1)
        assert torch.allclose(torch.tensor(stored, dtype=torch.float32), top.values.flatten(), atol=2e-2)
        assert math.isclose(row["seq_logprob"], float(lp.gather(-1, ids[0, len(prompt) :, None]).sum()), abs_tol=1e-3)
    sampled = [*GEN, "--set", "samples=2", "--set", "temperature=0.8"]
    cli.ok("generate-teacher-data", "--teacher", moe, "--out", tmp_path / "t", "--decode", "scmoe", *sampled)
    assert pq.read_table(tmp_path / "t").num_rows == 2 * len(g)


@pytest.mark.parametrize("command", ["evaluate", "generate-teacher-data"])
def test_decode_bad_input(cli, models, tmp_path, command):
    flag, args = ("--model", EV) if command == "evaluate" else ("--teacher", GEN)
    moe, dense, out = models / "moe", models / "dense", tmp_path / "o"
    cases = [
        ((flag, dense, "--decode", "scmoe"), f"needs a mixture-of-experts model; {dense} has no router"),
        ((flag, moe, "--decode", "scmoe", "--set", "scmoe_weak_rank=5"), "mismatched expert counts"),
        ((flag, moe, "--decode", "beam"), "unknown decode 'beam'"),
        ((flag, moe, "--decode", "scmoe", "--set", "scmoe_beta=-0.5"), "scmoe_beta must be >= 0"),
        ((flag, moe, "--decode", "scmoe", "--set", "scmoe_alpha=0"), "scmoe_alpha must be in (0, 1]"),
        ((flag, moe, "--decode", "scmoe", "--set", "scmoe_alpha=1.5"), "scmoe_alpha must be in (0, 1]"),
    ]
    for extra, match in cases:
        cli.fails(command, *extra, "--out", out, *args, match=match)
        assert not out.exists() and not out.with_name("o.partial").exists()
