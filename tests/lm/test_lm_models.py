"""Tiny language models built from a config load back in plain transformers, offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.errors import DistilError
from stages.lm.models import LMSize, active_parameters, build_lm, check_same_tokenizer, is_moe, load_lm, train_tokenizer
from stages.lm.training import RouterAuxLoss
from stages.tasks.reasoning import ReasoningTask

TEXTS = [r["prompt"] + " " + r["answer"] for r in ReasoningTask("basic_arithmetic", sizes=(200, 10, 10)).table().to_pylist()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, vocab_size=400, out=tmp_path_factory.mktemp("tok"))


def test_tokenizer_round_trips_task_text(tokenizer):
    text = TEXTS[0]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # merges learned from the task text compress it
    assert tokenizer.pad_token and tokenizer.eos_token and len(tokenizer) <= 400


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mixtral", "qwen2_moe", "olmoe"])
def test_built_models_save_and_load_in_plain_transformers(tokenizer, tmp_path, family):
    model = build_lm(family, LMSize(hidden=32, layers=1, heads=2, context=64), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok("Question: 1 + 1")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, again.eval()(ids).logits, atol=1e-6)
    loaded, tok2 = load_lm(tmp_path)
    assert loaded.config.vocab_size == len(tok2)


def test_load_lm_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistilError, match="no model weights"):
        load_lm(tmp_path / "empty")
    with pytest.raises(DistilError, match="neither a directory, a shipped model"):
        load_lm("not-a-model")


def test_tokenizer_mismatch_names_both_vocab_sizes(tokenizer):
    other = train_tokenizer(TEXTS[:50], vocab_size=320)
    with pytest.raises(DistilError, match=r"400|3\d\d"):
        check_same_tokenizer(tokenizer, other, "kd")
    check_same_tokenizer(tokenizer, tokenizer, "kd")


def test_moe_active_parameters_match_a_dense_model_of_k_experts_width(tokenizer):
    """4 experts of width 64, 2 per token, use the parameters of one MLP of width 128."""
    moe = build_lm("mixtral", LMSize(hidden=32, layers=2, heads=2, intermediate=64, experts=4, experts_per_token=2), tokenizer)
    dense = build_lm("llama", LMSize(hidden=32, layers=2, heads=2, intermediate=128), tokenizer)
    routers = 2 * 4 * 32  # one [experts, hidden] router per layer
    assert is_moe(moe) and not is_moe(dense)
    assert active_parameters(dense) == sum(p.numel() for p in dense.parameters())
    assert active_parameters(moe) == active_parameters(dense) + routers
    assert sum(p.numel() for p in moe.parameters()) > active_parameters(moe)


def test_router_load_balancing_loss_is_added_only_in_training_forwards(tokenizer):
    model = build_lm("mixtral", LMSize(hidden=32, layers=2, heads=2, experts=4, router_aux_loss=0.5), tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 9))
    aux = RouterAuxLoss(model)
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert aux.add_to(torch.tensor(1.0)) == 1.0  # evaluation passes add nothing
    out = model.train()(input_ids=ids)
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    total = aux.add_to(torch.tensor(1.0))
    assert float(total) == pytest.approx(1.0 + 0.5 * float(out.aux_loss))
    assert aux.add_to(torch.tensor(1.0)) == 1.0  # used once
    aux.close()
    assert model.config.output_router_logits is False
    dense = build_lm("llama", LMSize(hidden=32, layers=1, heads=2), tokenizer)
    dense_aux = RouterAuxLoss(dense)
    dense.train()(input_ids=ids)
    assert dense_aux.add_to(torch.tensor(2.0)) == 2.0
