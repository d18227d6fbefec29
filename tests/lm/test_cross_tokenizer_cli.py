"""Cross-tokenizer methods through the CLI: a student with its own tokenizer learns from teacher data."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.lm.models import train_tokenizer

LM = ["--set", "data.sizes=[120,20,20]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip
GEN = ["--set", "data.sizes=[120,20,20]", "--set", "samples=2", "--set", "temperature=1.0", "--set", "top_k=8",
       "--set", "max_new_tokens=6", "--set", "shard_prompts=32", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("xt")
    cli = Cli(write_params(root))
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "m", "--set", "epochs=3", *LM)
    cli.ok("generate-teacher-data", "--teacher", root / "m", "--data", "basic_arithmetic", "--out", root / "td", *GEN)
    train_tokenizer([f"{a} plus {b} makes {a + b}, ok?" for a in range(30) for b in range(10)], 420, out=root / "tok")
    return root


@pytest.mark.parametrize("method", ["uld", "span-kd"])
def test_cross_tokenizer_methods_train_a_student_with_its_own_tokenizer(cli, teacher_data, tmp_path, method):
    cli.ok("distill", "--method", method, "--data", teacher_data / "td", "--out", tmp_path / "s", "--set", "epochs=2",
           "--set", f"lm.tokenizer={teacher_data / 'tok'}", *LM)  # fmt: skip
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert len(history) == 2 and all(h["train_loss"] == h["train_loss"] for h in history)
    assert AutoTokenizer.from_pretrained(tmp_path / "s").get_vocab() == AutoTokenizer.from_pretrained(teacher_data / "tok").get_vocab()
    assert AutoTokenizer.from_pretrained(tmp_path / "s").get_vocab() != AutoTokenizer.from_pretrained(teacher_data / "m").get_vocab()
    AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    cli.fails("distill", "--method", "kd", "--data", teacher_data / "td", "--out", tmp_path / "k",
              "--set", f"lm.tokenizer={teacher_data / 'tok'}", *LM, match="tokenizer")  # fmt: skip
