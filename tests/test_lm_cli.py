"""The LM track through the CLI: sft on a reasoning task, evaluation by the task scorer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

LM = ["--set", "data.sizes=[120,20,20]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("lm")
    Cli(write_params(root)).ok(
        "distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "m", "--set", "epochs=3", *LM
    )
    return root / "m"


def test_sft_trains_a_model_plain_transformers_loads(lm_dir):
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    assert model.config.vocab_size == len(tok) and model.config.model_type == "llama"
    history = json.loads((lm_dir / "training.json").read_text())["history"]
    assert len(history) == 3
    assert history[-1]["dev_loss"] < history[0]["dev_loss"]  # it learns the task's answer format
    assert not (lm_dir / "checkpoint").exists()


def test_evaluate_scores_lm_answers_with_the_task_scorer(cli, lm_dir, tmp_path):
    cli.ok("evaluate", "--model", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "ev", "--set", "data.sizes=[120,20,20]",
           "--set", "max_new_tokens=6")  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["m"]
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["unparsed_share"] <= 1.0 and m["rows"] == 20


def test_lm_bad_input(cli, tmp_path):
    cli.fails(
        "distill",
        "--method",
        "kd",
        "--data",
        "basic_arithmetic",
        "--out",
        tmp_path / "o",
        *LM,
        match="not available for language models",
    )
    cli.fails("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "o", *LM, "--set", "lm.context=6",
              match="longer than the context")  # fmt: skip
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    cli.fails("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "o", *LM,
              "--set", f"lm.init={tmp_path / 'noweights'}", match="no model weights")  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    cli.fails("distill", "--method", "sft", "--data", prompts, "--out", tmp_path / "o", *LM, match="train and dev splits")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
