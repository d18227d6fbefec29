"""mst for language models: task mixtures, a shared tokenizer, teacher data from several
teachers, and a gate that picks one teacher per prompt for the student to distil."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.errors import DistilError

MIX = "chain_sum+basic_arithmetic"
SIZES = ["--set", "data.sizes=[40,10,10]"]
LM = [*SIZES, "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2", "--set", "batch_size=16",
      "--set", "lr=0.01", "-q"]  # fmt: skip
GEN = [*SIZES, "--set", "samples=2", "--set", "temperature=1.0", "--set", "top_k=8", "--set", "max_new_tokens=6",
       "--set", "shard_prompts=16", "--set", "splits=[train,dev]", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def mst(tmp_path_factory):
    """A shared tokenizer, a specialist teacher per task of the mixture, their teacher data."""
    from conftest import Cli, write_params

    from stages.lm.models import train_tokenizer
    from stages.tasks.mixture import build_task

    root = tmp_path_factory.mktemp("mst")
    mixture = build_task(MIX, sizes=(40, 10, 10), seed=0, task_options={}, unlabeled=0)
    train_tokenizer((r["prompt"] + " " + r["answer"] for r in mixture.table().to_pylist()), 320, out=root / "tok")
    c = Cli(write_params(root))
    for name in MIX.split("+"):
        c.ok("distill", "--method", "sft", "--data", name, "--out", root / name, "--set", "epochs=2",
             "--set", f"lm.tokenizer={root / 'tok'}", *LM)  # fmt: skip
    c.ok("generate-teacher-data", "--teacher", root / "chain_sum", "--teacher", root / "basic_arithmetic", "--data", MIX,
         "--out", root / "td", *GEN)  # fmt: skip
    return root


# ---- task mixtures -----------------------------------------------------------------------


def test_a_mixture_is_one_prompt_table_over_its_tasks():
    from stages.config import DataConfig
    from stages.modality import of_data
    from stages.tasks import load_prompts
    from stages.tasks.mixture import ITEM_STRIDE, TaskMixture
    from stages.tasks.reasoning import ReasoningTask

    table, task = load_prompts(MIX, DataConfig(sizes=[30, 10, 10]))
    rows = table.to_pylist()
    assert of_data(MIX, DataConfig()) == "lm" and isinstance(task, TaskMixture) and task.name == MIX
    assert {r["task"] for r in rows} == {"chain_sum", "basic_arithmetic"}
    assert len({r["id"] for r in rows}) == len(rows)
    for position, name in enumerate(MIX.split("+")):  # each task as it would be alone, items offset by position
        alone = ReasoningTask(name, (30, 10, 10)).table().to_pylist()
        mine = [r for r in rows if r["task"] == name]
        assert [(r["split"], r["prompt"], r["answer"]) for r in mine] == [(r["split"], r["prompt"], r["answer"]) for r in alone]
        assert [r["item"] for r in mine] == [position * ITEM_STRIDE + r["item"] for r in alone]
    for name in MIX.split("+"):  # the right task's scorer rescores each answer
        row = next(r for r in rows if r["task"] == name and r["split"] == "test")
        assert task.score(row["answer"], "test", row["item"]) == 1.0
        assert task.score("not an answer", "test", row["item"]) == 0.0
    limited, _ = load_prompts(MIX, DataConfig(sizes=[30, 10, 10], limit=5))  # the limit holds per task and split
    assert len(limited) == 2 * 3 * 5 and {r["task"] for r in limited.to_pylist()} == {"chain_sum", "basic_arithmetic"}


def test_mixture_options_are_keyed_by_task():
    from stages.config import DataConfig
    from stages.tasks import load_prompts

    opts = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    table, _ = load_prompts(MIX, DataConfig(sizes=[10, 5, 5], task_options=opts))
    for row in (r for r in table.to_pylist() if r["task"] == "chain_sum"):
        numbers = [t for t in row["prompt"].replace("=", " ").split() if t.lstrip("-").isdigit()]
        assert len(numbers) == 2 and all(len(n.lstrip("-")) == 1 for n in numbers)
    alone, _ = load_prompts("chain_sum", DataConfig(sizes=[10, 5, 5], task_options=opts))  # keyed works for one task too
    assert alone.column("prompt").to_pylist() == [r["prompt"] for r in table.to_pylist() if r["task"] == "chain_sum"]
    with pytest.raises(DistilError, match="key the options by task"):
        load_prompts(MIX, DataConfig(task_options={"max_terms": 2}))
    with pytest.raises(DistilError, match="more than once"):
        load_prompts("chain_sum+chain_sum", DataConfig())
    with pytest.raises(DistilError, match="unknown reasoning task 'chess'"):
        load_prompts("chain_sum+chess", DataConfig())


def test_the_manifest_rebuilds_the_mixture(mst):
    from stages.artifacts import read_manifest
    from stages.config import DataConfig
    from stages.tasks import load_prompts
    from stages.tasks.mixture import task_from_manifest

    manifest = read_manifest(mst / "td")
    assert manifest["task"]["name"] == MIX
    rebuilt = task_from_manifest(manifest)
    _, task = load_prompts(MIX, DataConfig(sizes=[40, 10, 10], limit=60))
    assert rebuilt == task
    for row in pq.read_table(mst / "td").to_pylist()[:40]:  # the stored scores are the rebuilt task's
        assert rebuilt.score(row["answer"], row["split"], row["item"]) == pytest.approx(row["score"])


# ---- one tokenizer ---------------------------------------------------------------------------


def test_teachers_built_with_lm_tokenizer_share_one_vocabulary(mst, cli, tmp_path):
    shared = AutoTokenizer.from_pretrained(mst / "tok").get_vocab()
    for name in MIX.split("+"):
        assert AutoTokenizer.from_pretrained(mst / name).get_vocab() == shared
        assert AutoModelForCausalLM.from_pretrained(mst / name).config.vocab_size == len(shared)
    cli.fails("distill", "--method", "sft", "--data", "chain_sum", "--out", tmp_path / "o", *LM,
              "--set", f"lm.tokenizer={mst / 'tok'}", "--set", f"lm.init={mst / 'chain_sum'}", match="drop one")  # fmt: skip
    cli.fails("distill", "--method", "sft", "--data", "chain_sum", "--out", tmp_path / "o", *LM,
              "--set", f"lm.tokenizer={tmp_path}", match="holds no tokenizer")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ---- teacher data from several teachers ------------------------------------------------------


def test_every_teacher_samples_every_prompt(mst):
    table = pq.read_table(mst / "td")
    rows = table.to_pylist()
    manifest = json.loads((mst / "td" / ".manifest.json").read_text())
    assert [t["tasks"] for t in manifest["teachers"]] == [["chain_sum"], ["basic_arithmetic"]]
    assert [t["path"] for t in manifest["teachers"]] == [str(mst / "chain_sum"), str(mst / "basic_arithmetic")]
    assert manifest["model"]["path"] == str(mst / "chain_sum") and manifest["top_k"] == 8
    assert len(set(table.column("id").to_pylist())) == len(rows)
    per = {}
    for r in rows:
        per.setdefault(r["prompt_id"], []).append(r["teacher"])
    assert all(sorted(t) == [0, 0, 1, 1] for t in per.values())  # 2 samples from each teacher
    assert {r["task"] for r in rows} == {"chain_sum", "basic_arithmetic"}
    assert all(r["score"] is not None for r in rows)  # each task's own scorer


def test_multi_teacher_data_resumes_without_duplicates(mst, tmp_path):
    from conftest import Cli, dies_on_call, write_params

    from stages.artifacts import TableWriter

    c = Cli(write_params(tmp_path))
    args = ["generate-teacher-data", "--teacher", mst / "chain_sum", "--teacher", mst / "basic_arithmetic", "--data", MIX,
            "--out", tmp_path / "td", *GEN]  # fmt: skip
    parts = len(list((mst / "td").glob("part-*.parquet")))
    with dies_on_call(TableWriter, "write", parts // 2 + 2, after=False):  # killed in the second teacher's parts
        assert c(*args).exit_code == 130
    assert (tmp_path / "td.partial").exists()
    c.ok(*args)
    resumed, ref = pq.read_table(tmp_path / "td"), pq.read_table(mst / "td")
    for col in ("id", "teacher", "completion"):
        assert resumed.column(col).to_pylist() == ref.column(col).to_pylist()


def test_select_correct_and_old_files_without_a_teacher_column(mst, cli, tmp_path):
    from stages.artifacts import LM_TEACHER_DATA, read_table

    cli.ok("select", mst / "td", "--by", "correct", "--set", "min_score=0", "--out", tmp_path / "sel", "-q")
    sel = pq.read_table(tmp_path / "sel")
    assert set(sel.column("teacher").to_pylist()) == {0, 1}
    assert len(json.loads((tmp_path / "sel" / ".manifest.json").read_text())["teachers"]) == 2
    old = tmp_path / "old"  # teacher data written before the teacher column existed
    old.mkdir()
    shutil.copy(mst / "td" / ".manifest.json", old / ".manifest.json")
    part = pq.read_table(sorted((mst / "td").glob("part-*.parquet"))[0])
    pq.write_table(part.drop_columns(["teacher"]), old / "part-00000.parquet")
    table, _ = read_table(old, LM_TEACHER_DATA, "teacher data")
    assert table.column("teacher").null_count == table.num_rows
    cli.ok("select", old, "--by", "length", "--out", tmp_path / "sel_old", "-q")


def test_teachers_need_one_tokenizer_for_top_k(mst, cli, tmp_path):
    from stages.lm.models import train_tokenizer

    other = tmp_path / "other"
    shutil.copytree(mst / "basic_arithmetic", other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["Question: 1 + 2\nAnswer: 3"] * 20, 300, out=other)
    args = ["generate-teacher-data", "--teacher", mst / "chain_sum", "--teacher", other, "--data", MIX, "--out", tmp_path / "td"]
    cli.fails(*args, *GEN, match="different tokenizers")
    assert not (tmp_path / "td").exists() and not (tmp_path / "td.partial").exists()
    cli.fails("generate-teacher-data", "--teacher", tmp_path / "a", "--teacher", tmp_path / "b", "--data", "digits",
              "--out", tmp_path / "c", match="one --teacher")  # fmt: skip


# ---- the gate and the student ----------------------------------------------------------------


def test_mst_with_the_task_gate_learns_each_task_from_its_specialist(mst, cli, tmp_path):
    cli.ok("distill", "--method", "mst", "--data", mst / "td", "--out", tmp_path / "s", "--set", "gate=task",
           "--set", "epochs=1", *LM)  # fmt: skip
    done = json.loads((tmp_path / "s" / "training.json").read_text())
    prompts = {}
    for r in pq.read_table(mst / "td").to_pylist():
        if r["split"] == "train":
            prompts[r["prompt_id"]] = r["task"]
    n = {t: sum(v == t for v in prompts.values()) for t in ("chain_sum", "basic_arithmetic")}
    assert done["method"] == "mst" and done["gate"] == "task"
    assert done["teacher_wins_by_task"] == {"basic_arithmetic": [0, n["basic_arithmetic"]], "chain_sum": [n["chain_sum"], 0]}
    assert done["teacher_wins"] == [n["chain_sum"], n["basic_arithmetic"]]
    assert done["train_rows"] <= 2 * len(prompts)  # one teacher's two samples per prompt, not both teachers'
    assert len(done["history"]) == 1 and done["history"][0]["train_loss"] == done["history"][0]["train_loss"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def test_mst_with_the_confidence_gate_is_the_default(mst, cli, tmp_path):
    cli.ok("distill", "--method", "mst", "--data", mst / "td", "--out", tmp_path / "s", "--set", "epochs=1", *LM)
    done = json.loads((tmp_path / "s" / "training.json").read_text())
    train = {r["prompt_id"] for r in pq.read_table(mst / "td").to_pylist() if r["split"] == "train"}
    assert done["gate"] == "confidence" and sum(done["teacher_wins"]) == len(train)
    assert sum(sum(v) for v in done["teacher_wins_by_task"].values()) == len(train)


def test_the_confidence_gate_on_hand_made_rows():
    from stages.lm.methods.mst import confidence_gate

    def row(prompt, teacher, answer, logprob):
        return {"prompt_id": prompt, "teacher": teacher, "answer": answer, "seq_logprob": logprob}

    rows = [
        row(0, 0, "4", -1.0), row(0, 0, "4.", -1.0), row(0, 1, "4", -0.1), row(0, 1, "5", -0.1),  # 0 agrees more
        row(1, 0, "7", -3.0), row(1, 0, "7", -3.0), row(1, 1, "8", -1.0), row(1, 1, "8", -2.0),  # tie: 1 is likelier
        row(2, 0, None, -0.1), row(2, 0, None, -0.1), row(2, 1, "2", -5.0), row(2, 1, None, -5.0),  # unparsed never agree
        row(3, 0, "1", -1.0), row(3, 1, "1", -1.0),  # a full tie: the lower index
        row(4, 1, "9", -1.0), row(4, None, "3", -2.0),  # null teacher (old files) = teacher 0
    ]  # fmt: skip
    assert confidence_gate(rows, [{}, {}]) == {0: 0, 1: 1, 2: 1, 3: 0, 4: 1}


def test_the_task_gate_prefers_the_specialist_and_refuses_an_unknown_task():
    from stages.lm.methods.mst import task_gate

    teachers = [{"tasks": ["chain_sum", "basic_arithmetic"]}, {"tasks": ["chain_sum"]}, {"tasks": ["basic_arithmetic"]}]
    rows = [{"prompt_id": 0, "task": "chain_sum"}, {"prompt_id": 1, "task": "basic_arithmetic"}]
    assert task_gate(rows, teachers) == {0: 1, 1: 2}
    assert task_gate(rows, teachers[:1]) == {0: 0, 1: 0}
    with pytest.raises(DistilError, match="no teacher was trained on task 'number_sorting'"):
        task_gate([*rows, {"prompt_id": 2, "task": "number_sorting"}], teachers)


def test_mst_bad_input(mst, cli, tmp_path):
    cli.ok("generate-teacher-data", "--teacher", mst / "chain_sum", "--data", "chain_sum", "--out", tmp_path / "one",
           "--set", "samples=1", *GEN)  # fmt: skip
    assert set(pq.read_table(tmp_path / "one").column("teacher").to_pylist()) == {0}
    cli.fails("distill", "--method", "mst", "--data", tmp_path / "one", "--out", tmp_path / "s", *LM, match="--method kd")
    for bad, match in (("gate=vote", "unknown gate"), ("top_k=2", "one teacher per prompt")):
        cli.fails("distill", "--method", "mst", "--data", mst / "td", "--out", tmp_path / "s", "--set", bad, *LM, match=match)
    cli.fails("distill", "--method", "mst", "--data", MIX, "--out", tmp_path / "s", *LM, match="needs LM teacher data")
    cli.fails("distill", "--method", "sft", "--data", MIX, "--out", tmp_path / "s", *LM,
              "--set", "data.task_options={max_terms: 2}", match="key the options by task")  # fmt: skip
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_evaluate_reports_accuracy_per_task_on_a_mixture(mst, cli, tmp_path):
    cli.ok("evaluate", "--model", mst / "chain_sum", "--data", MIX, "--out", tmp_path / "ev", *SIZES,
           "--set", "max_new_tokens=6", "-q")  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["chain_sum"]
    assert m["rows"] == 20 and {"accuracy_chain_sum", "accuracy_basic_arithmetic"} <= set(m)
    assert m["accuracy"] == pytest.approx((m["accuracy_chain_sum"] + m["accuracy_basic_arithmetic"]) / 2)


def test_mst_is_listed_for_language_models(cli):
    classifiers, lms = cli("distill", "--help").output.split("Language-model methods")
    assert "mst:" in classifiers and "mst:" in lms  # one name; the data decides which mst runs
