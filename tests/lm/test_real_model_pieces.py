"""The pieces of the real-model pipeline (pipelines/smollm2) on tiny models: reasoning tasks
as chat prompts (``data.chat``, ``data.system``), a depth-pruned pretrained student
(``lm.keep_layers``), and ``evaluate --teacher``'s likeness metrics checked against a
brute-force computation; bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from one_thread import one_thread  # noqa: F401  (autouse: one torch thread for this module)

from stages.errors import DistilError
from stages.lm.likeness import likeness
from stages.lm.models import draw_wide, keep_layers, load_lm
from stages.tasks.messages import from_json

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATA = ["--set", "data.sizes=[32,4,6]", "--set", "data.chat=true", "--set", "data.system=Answer with one number."]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random 3-layer Llama with a ChatML template, weights drawn wide so prompts differ."""
    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.tasks.reasoning import ReasoningTask

    path = tmp_path_factory.mktemp("pruned") / "teacher"
    rows = ReasoningTask("chain_sum", (32, 4, 6), chat=True).table().to_pylist()
    tok = train_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], 320)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    model = draw_wide(build_lm("llama", LMSize(hidden=32, layers=3, heads=2, context=128), tok, seed=4), 0.2, seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reasoning_tasks_as_chat_prompts():
    from stages.config import DataConfig
    from stages.tasks import load_prompts

    table, task = load_prompts("spell_backward+chain_sum", DataConfig(sizes=[4, 1, 2], chat=True, system="Be brief."))
    rows = table.to_pylist()
    assert {r["task"] for r in rows} == {"spell_backward", "chain_sum"}
    for r in rows:
        turns = from_json(r["messages"])
        assert [m["role"] for m in turns] == ["system", "user"] and turns[0]["content"] == "Be brief."
        assert "Question:" not in turns[1]["content"] and turns[1]["content"] in r["prompt"]
    plain_rows = load_prompts("spell_backward+chain_sum", DataConfig(sizes=[4, 1, 2]))[0].to_pylist()
    assert all(r["messages"] is None for r in plain_rows)
    assert [r["answer"] for r in plain_rows] == [r["answer"] for r in rows]  # the same items, only the prompt's form differs
    first = next(r for r in rows if r["split"] == "test")
    assert task.score(first["answer"], "test", first["item"]) == 1.0


def test_keep_layers_reindexes_attention_and_saves_a_plain_model(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_lm(teacher)
    full = model.model.layers
    kept = [full[0], full[2]]
    keep_layers(model, [0, 2])
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    x = tok(["Question: 1 + 2 =", "Question: 7 - 3 - 1 ="], return_tensors="pt", padding=True)
    cached = model.generate(**x, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    fresh = model.generate(**x, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, fresh)  # the KV cache is addressed by the new indices
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert again.config.num_hidden_layers == 2
    assert torch.allclose(again(**x).logits, model(**x).logits, atol=1e-6)
    for bad in ([], [2, 0], [0, 0], [3]):
        with pytest.raises(DistilError, match="increasing layer indices in 0..2"):
            keep_layers(load_lm(teacher)[0], bad)


def test_pruned_student_distils_through_the_cli(cli, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    gen = ["--set", "samples=1", "--set", "temperature=0", "--set", "max_new_tokens=4", "--set", "top_k=4", "-q"]
    cli.ok("generate-teacher-data", "--teacher", teacher, "--data", "chain_sum", *DATA, *gen, "--out", tmp_path / "td")
    train = ["--set", "lm.keep_layers=[0,2]", "--set", "batch_size=8", "--set", "steps=4", "--set", "lr=0.001", "-q"]
    cli.ok("distill", "--method", "kd", "--student", teacher, "--data", tmp_path / "td", *DATA, *train, "--out", tmp_path / "kd")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "kd")
    assert student.config.num_hidden_layers == 2
    manifest = json.loads((tmp_path / "kd" / ".manifest.json").read_text())
    assert manifest["params"]["distill"]["lm"]["keep_layers"] == [0, 2]
    cli.fails("distill", "--method", "kd", "--data", tmp_path / "td", *DATA, *train, "--out", tmp_path / "x",
              match="keep_layers prunes a pretrained student")  # fmt: skip
    cli.fails("distill", "--method", "kd", "--student", teacher, "--data", tmp_path / "td", *DATA, *train,
              "--set", "lm.keep_layers=[0,5]", "--out", tmp_path / "x", match="0..2")  # fmt: skip
    cli.fails("generate-teacher-data", "--teacher", teacher, "--data", "chain_sum", "--set", "data.system=Hi", *gen,
              "--out", tmp_path / "x", match="data.chat=true")  # fmt: skip
    assert not (tmp_path / "x").exists()

    cli.ok("evaluate", "--model", tmp_path / "kd", "--teacher", teacher, "--data", tmp_path / "td", *DATA,
           "--set", "max_new_tokens=4", "--set", "batch_size=4", "--out", tmp_path / "ev")  # fmt: skip
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "kd"} and metrics["kd"]["rows"] == 6  # batches of 4: each prompt once
    t, s = metrics["teacher"], metrics["kd"]
    assert t["role"] == "teacher" and s["role"] == "student"
    assert t["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and t["top1_agreement"] == 1 and t["greedy_match"] == 1
    assert t["speedup"] == 1 and s["speedup_min"] <= s["speedup"] <= s["speedup_max"]
    assert s["kl_to_teacher"] > 0.01 and 0 <= s["top1_agreement"] <= 1 and 0 <= s["greedy_match"] <= 1 and s["speedup"] > 0
    assert "KL to teacher" in (tmp_path / "ev" / "summary.txt").read_text()


def test_likeness_equals_a_brute_force_per_prompt_computation(teacher, tmp_path):
    """Left padding, logits_to_keep and the batching change nothing: KL and top-1 agreement
    equal a per-prompt forward over the whole sequence without padding."""
    model, tok = load_lm(teacher)
    student = load_lm(teacher)[0]
    keep_layers(student, [1])
    student.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    prompts = [f"Question: {a} + {b} =" for a, b in [(1, 2), (30, 4), (5, 66), (7, 8), (9, 1), (2, 2), (3, 41), (8, 8), (4, 5)]]
    lengths = [1, 3, 6, 2, 5, 4, 1, 6, 3]  # answers of different lengths, across two batches of BATCH = 8
    reference = []
    for p, n in zip(prompts, lengths, strict=True):
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        reference.append({"prompt": p, "token_ids": out[0, ids.shape[1] :].tolist()})
    got = likeness(str(teacher), reference, {"s": str(tmp_path / "s"), "t": str(teacher)}, "cpu")

    kls, hits = [], []
    for r in reference:
        p_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        seq = torch.tensor([p_ids + r["token_ids"]])
        with torch.no_grad():
            t_lp = torch.log_softmax(model(seq).logits[0].double(), -1)[len(p_ids) - 1 : -1]
            s_lp = torch.log_softmax(student(seq).logits[0].double(), -1)[len(p_ids) - 1 : -1]
        kls += (t_lp.exp() * (t_lp - s_lp)).sum(-1).tolist()
        hits += (s_lp.argmax(-1) == torch.tensor(r["token_ids"])).tolist()
    assert len(kls) == sum(lengths)
    assert got["s"]["kl_to_teacher"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert got["s"]["top1_agreement"] == pytest.approx(sum(hits) / len(hits))
    assert got["t"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and got["t"]["top1_agreement"] == 1
