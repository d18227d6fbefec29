"""LoRA students (``lora.r`` > 0) and gradient checkpointing: only the adapter trains, for gold
(sft), stored teacher data (kd) and a live teacher (on-policy); the adapter is PEFT's own
format, the merged weights plain transformers; every distil command reads the folder as a
model; a killed LoRA run resumes; bad settings are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from one_thread import one_thread  # noqa: F401  (autouse: one torch thread for this module)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

SIZES = ["--set", "data.sizes=[40,8,8]"]
TRAIN = [*SIZES, "--set", "batch_size=8", "--set", "lr=0.03", "--set", "epochs=2", "-q"]
LORA = ["--set", "lora.r=4", "--set", "lora.alpha=8"]



def tiny_base(path: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A random tiny Llama, from a config, with a BPE tokenizer of the task's text, saved to ``path``."""
    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.tasks.reasoning import ReasoningTask

    rows = ReasoningTask("basic_arithmetic", (40, 8, 8)).table().to_pylist()
    tok = train_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], 320)
    build_lm("llama", LMSize(hidden=hidden, layers=layers, heads=2, context=128), tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random base, a teacher fine-tuned from it (same tokenizer), its teacher data, and a
    spy on ``fit`` that records each student's weights before and after training."""
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("lora")
    c = Cli(write_params(root))
    base = tiny_base(root / "base")
    c.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--student", base, "--out", root / "teacher",
         *TRAIN, "--set", "epochs=4")  # fmt: skip
    c.ok("generate-teacher-data", "--teacher", root / "teacher", "--data", "basic_arithmetic", "--out", root / "td", *SIZES,
         "--set", "samples=1", "--set", "top_k=8", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    return {"cli": c, "root": root, "base": base, "teacher": root / "teacher", "td": root / "td"}


@pytest.fixture(scope="module")
def students(lm):
    """LoRA students of three methods (weights before / after ``fit`` recorded): sft with
    merged weights, kd with gradient checkpointing, on-policy against the live teacher."""
    import stages.lm.distill as mod

    seen, fit = {}, mod.fit

    def spy(model, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        summary = fit(model, *args, **kwargs)
        seen[args[2].method] = (before, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return summary

    runs = {
        "sft": ["--data", "basic_arithmetic", "--set", "lora.merge=true"],
        "kd": ["--data", lm["td"], "--set", "lm.gradient_checkpointing=true"],
        "on-policy": ["--data", "basic_arithmetic", "--teacher", lm["teacher"], "--set", "lmbda=0.5", "--set", "lm.max_new_tokens=4"],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "fit", spy)
        for method, args in runs.items():
            lm["cli"].ok("distill", "--method", method, *args, "--student", lm["base"], "--out", lm["root"] / method,
                         *TRAIN, *LORA, "--set", "epochs=3")  # fmt: skip
    return {m: {"out": lm["root"] / m, "before": seen[m][0], "after": seen[m][1]} for m in runs}


@pytest.mark.parametrize("method", ["sft", "kd", "on-policy"])
def test_only_the_adapter_trains(lm, students, method):
    run = students[method]
    before, after = run["before"], run["after"]
    adapter = [k for k in after if "lora_" in k]
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(torch.equal(before[k], after[k]) for k in after if k not in adapter)  # the base, bitwise
    assert any(not torch.equal(before[k], after[k]) for k in adapter if ".lora_B." in k)  # B starts at 0: it moved
    base = load_file(lm["base"] / "model.safetensors")
    plain = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in after.items() if k not in adapter}
    assert set(base) <= set(plain) and all(torch.equal(base[k], plain[k]) for k in base)  # what is on disk, too
    done = json.loads((run["out"] / "training.json").read_text())
    assert done["trainable_params"] == sum(after[k].numel() for k in adapter) < done["params"] / 10
    assert done["init"] == str(lm["base"]) and done["lora"] == {"r": 4, "merged": method == "sft"}
    losses = [h["train_loss"] for h in done["history"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if method != "on-policy":  # on-policy's batches are partly the student's own fresh samples
        assert losses[-1] < losses[0]
    stored = load_file(run["out"] / "adapter_model.safetensors")
    assert stored and all("lora_" in k for k in stored)  # the adapter alone is written, in PEFT's format
    assert not (run["out"] / "config.json").exists() and not (run["out"] / "model.safetensors").exists()


def test_the_adapter_loads_with_peft_and_the_merged_weights_with_plain_transformers(lm, students):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = students["sft"]["out"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(lm["base"])
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm["base"]), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(lm["base"]).eval()
    with torch.no_grad():
        ref = with_adapter(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, ref, atol=1e-5)
        assert torch.allclose(auto(input_ids=ids).logits, ref, atol=1e-5)
        assert (base(input_ids=ids).logits - ref).abs().max() > 1e-3  # the adapter does change the model
    assert not any("lora" in k for k in load_file(out / "merged" / "model.safetensors"))


def test_load_lm_reads_a_lora_student_as_one_plain_model(lm, students):
    from stages.lm.models import lm_identity, load_lm
    from stages.modality import LM, of_model

    ids = torch.tensor([[1, 40, 41, 42]])
    for method in ("sft", "kd"):  # merged weights present / the base + adapter merged on load
        out = students[method]["out"]
        model, tokenizer = load_lm(out)
        assert type(model).__name__ == "LlamaForCausalLM" and of_model(out) == LM
        assert tokenizer.get_vocab() == load_lm(lm["base"])[1].get_vocab()
        from peft import PeftModel

        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm["base"]), out).eval()
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    kd = students["kd"]["out"]
    assert lm_identity(kd)["sha256"] != lm_identity(students["on-policy"]["out"])["sha256"]
    assert json.loads((kd / "training.json").read_text())["history"]  # gradient checkpointing trained
    assert not any(getattr(m, "gradient_checkpointing", False) for m in load_lm(kd)[0].modules())  # saved without it


def test_every_command_takes_a_lora_student_as_a_model(lm, students):
    import pyarrow.parquet as pq

    c, root, kd = lm["cli"], lm["root"], students["kd"]["out"]
    c.ok("evaluate", "--model", kd, "--model", students["sft"]["out"], "--data", "basic_arithmetic", "--out", root / "ev",
         *SIZES, "--set", "max_new_tokens=4")  # fmt: skip
    metrics = json.loads((root / "ev" / "metrics.json").read_text())
    assert {"kd", "sft"} <= set(metrics) and metrics["kd"]["rows"] == 8
    c.ok("generate-teacher-data", "--teacher", kd, "--data", "basic_arithmetic", "--out", root / "td_lora", *SIZES,
         "--set", "samples=1", "--set", "top_k=4", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    table = pq.read_table(root / "td_lora")
    assert table.num_rows > 0 and len(table.column("topk_ids")[0].as_py()) == 4 * len(table.column("token_ids")[0].as_py())
    c.ok("cascade", "--student", kd, "--teacher", lm["teacher"], "--data", lm["td"], "--out", root / "cascade",
         "--policy", "sc-cascade", "--set", "samples=2", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    assert json.loads((root / "cascade" / "metrics.json").read_text())
    c.ok("cascade", "--student", lm["teacher"], "--teacher", kd, "--data", lm["td"], "--out", root / "cascade_t",
         "--policy", "sc-cascade", "--set", "samples=2", "--set", "max_new_tokens=4", "-q")  # fmt: skip


def test_a_killed_lora_run_resumes_to_the_same_adapter(lm, tmp_path):
    from conftest import dies_on_call

    import stages.lm.training as training
    from stages import distill
    from stages.config import DataConfig, DistillConfig, LMConfig, LoraConfig

    cfg = DistillConfig(method="sft", epochs=3, batch_size=8, lr=0.03, lm=LMConfig(init=str(lm["base"])), lora=LoraConfig(r=4))
    data_cfg = DataConfig(sizes=[40, 8, 8])
    distill.run(cfg, "basic_arithmetic", tmp_path / "ref", data_cfg=data_cfg, progress=False)
    with dies_on_call(training, "save_state", 2), pytest.raises(KeyboardInterrupt):
        distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    assert (tmp_path / "s.partial" / "checkpoint").exists()
    distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = load_file(tmp_path / "s" / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, lora):
    from stages.config import DistillConfig, LMConfig, LoraConfig
    from stages.lm.distill import _trainable
    from stages.lm.models import load_lm
    from stages.lm.training import IGNORE, next_token_loss

    base = tiny_base(tmp_path / "base")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 47, 48, 49, 50, 51, 2, 2]])
    batch = {"input_ids": ids, "attention_mask": (ids != 2).long(),
             "labels": torch.where(torch.arange(8) < 3, torch.tensor(IGNORE), ids)}  # fmt: skip

    def grads(checkpointing: bool):
        cfg = DistillConfig(lm=LMConfig(init=str(base), gradient_checkpointing=checkpointing), lora=LoraConfig(r=4 if lora else 0))
        model = _trainable(load_lm(base)[0], cfg)
        if lora:  # B = 0 at init would leave A without gradient: give the adapter a value
            torch.manual_seed(0)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.1)
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        loss = next_token_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0) and any(g0[k].abs().sum() > 0 for k in g0)
    assert all("lora_" in k for k in g0) == lora


def test_bad_lora_settings_are_one_line_and_write_nothing(lm, tmp_path):
    c, out = lm["cli"], tmp_path / "o"
    student = ["distill", "--method", "sft", "--data", "basic_arithmetic", "--out", out, *TRAIN]
    c.fails(*student, "--student", lm["base"], *LORA, "--set", "lora.target_modules=[q_proj,nope]",
            match="lora.target_modules nope: no such module in this model; its adaptable layers include")  # fmt: skip
    c.fails(*student, "--student", lm["base"], *LORA, "--set", "lora.target_modules=[norm]", match="peft cannot put LoRA")
    c.fails(*student, *LORA, match="lora.r > 0 adapts a pretrained student")
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_lora_settings_on_a_classifier_run_are_refused(cli, tmp_path):
    cli.fails("distill", "--method", "ce", "--data", "digits", "--out", tmp_path / "o", "--set", "lora.r=4", "--set", "epochs=1",
              match="lora")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_distil_serve_answers_with_a_lora_student(students):
    import httpx
    from loopback import serving

    from stages.config import ServeConfig, TeacherConfig
    from stages.lm.generation import generate
    from stages.lm.models import load_lm
    from stages.lm.serve import build_app
    from stages.lm.teachers import open_teacher
    from stages.modality import LM, of_model

    out = students["kd"]["out"]  # base + adapter, no merged weights
    assert of_model(out) == LM  # what `distil serve` routes on
    engine = open_teacher(out, TeacherConfig(), torch.device("cpu"))
    prompts = ["Question: 2 + 3 =", "Question: 7 - 1 ="]
    model, tokenizer = load_lm(out)
    expected = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, device="cpu")
    with serving(build_app(engine, ServeConfig(batch_wait_ms=1.0), "lora")) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/v1/completions", json={"model": "lora", "prompt": prompts, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == expected


@pytest.mark.parametrize("method", ["reverse-kl", "jsd", "skew-kl", "tvd", "tsd", "mst"])
def test_every_token_level_method_trains_a_lora_student(lm, method):
    data, out = lm["td"], lm["root"] / f"lora_{method}"
    if method == "mst":  # a gate over two teachers of one vocabulary: the fine-tuned teacher and its random base
        data = lm["root"] / "td_two"
        lm["cli"].ok("generate-teacher-data", "-t", lm["teacher"], "-t", lm["base"], "--data", "basic_arithmetic", "--out", data,
                     *SIZES, "--set", "samples=1", "--set", "top_k=8", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    lm["cli"].ok("distill", "--method", method, "--data", data, "--student", lm["base"], "--out", out, *TRAIN, *LORA,
                 "--set", "epochs=1")  # fmt: skip
    done = json.loads((out / "training.json").read_text())
    assert done["method"] == method and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in done["history"])
    assert 0 < done["trainable_params"] < done["params"] and all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))


def test_a_broken_lora_folder_is_one_clear_error(students, tmp_path):
    import shutil

    from stages.errors import DistilError
    from stages.lm.models import load_lm

    def copy(name: str, base=None) -> Path:
        d = shutil.copytree(students["kd"]["out"], tmp_path / name)
        if base is not None:
            config = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
        return d

    gone = copy("gone", base=tmp_path / "no-base")
    with pytest.raises(DistilError, match=r"is a LoRA adapter on .*no-base, which does not load: model directory .* does not exist"):
        load_lm(gone)
    pickled = copy("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(DistilError, match="no adapter_model.safetensors .*never \\*.bin pickles"):
        load_lm(pickled)
    selfish = copy("selfish", base=tmp_path / "selfish")
    with pytest.raises(DistilError, match="names itself"):
        load_lm(selfish)
    nameless = copy("nameless", base="")
    with pytest.raises(DistilError, match="names no base_model_name_or_path"):
        load_lm(nameless)
    narrow = copy("narrow", base=tiny_base(tmp_path / "narrow_base", hidden=16))
    with pytest.raises(DistilError, match="does not fit its base model .*narrow_base .*train it on that base"):
        load_lm(narrow)
    shallow = copy("shallow", base=tiny_base(tmp_path / "shallow_base", layers=1))
    with pytest.raises(DistilError, match="has weights its base model .*shallow_base has no layer for"):
        load_lm(shallow)
