"""Conversational data end to end: ``messages`` prompt tables in every format, chat templates
(the model's, an override, the plain format, ``required``), the assistant-only loss mask,
teacher data through a local and a served teacher, sft on gold and teacher chats, evaluation,
and bad input as one line."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.errors import DistilError
from stages.lm.chat import assistant_spans, encode_chat, install_template, render, row_prompt
from stages.lm.training import IGNORE
from stages.tasks.messages import final_answer, parse_messages, plain, prompt_turns
from stages.tasks.reasoning import load_prompt_table

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BRACKETS = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ '</s>' if m['role'] == 'assistant' else '' }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
"""An override: another layout, so a student trained with it is told apart from the model's own."""
THINK = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think></think>{% endif %}")
"""A generation prompt the rendered assistant turns lack (as Qwen3's empty think block): no prefix."""
SYSTEM = {"role": "system", "content": "Answer with one number."}
MULTI = [SYSTEM, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
         {"role": "user", "content": "and 2+3?"}, {"role": "assistant", "content": "5"}]  # fmt: skip
GEN = ["--set", "samples=1", "--set", "temperature=0", "--set", "max_new_tokens=4", "--set", "top_k=4", "-q"]
LM = ["--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2", "--set", "lm.vocab_size=320",
      "--set", "lm.context=96", "--set", "batch_size=8", "--set", "epochs=1", "-q"]  # fmt: skip
AS_CHAT = ["--set", "data.prompt_column=messages"]
"""Parquet and CSV tables go to the LM commands by their prompt column (stages.modality)."""


def conversation(i: int) -> list[dict]:
    a, b = i % 7, i // 7
    turns = [SYSTEM] if i % 2 == 0 else []
    if i % 3 == 0:
        turns += [{"role": "user", "content": f"{b}+1?"}, {"role": "assistant", "content": str(b + 1)}]
    return [*turns, {"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]


ROWS = [{"messages": conversation(i), "split": "train" if i < 16 else "dev" if i < 22 else "test"} for i in range(28)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A 1-layer random Llama whose tokenizer has a ChatML template and its two tokens."""
    from stages.lm.models import LMSize, build_lm, train_tokenizer

    path = tmp_path_factory.mktemp("chatlm") / "teacher"
    texts = [plain(r["messages"], add_generation_prompt=False) for r in ROWS] * 4
    tok = train_tokenizer(texts, 320)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    build_lm("llama", LMSize(hidden=32, layers=1, heads=2, context=128), tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(chat_model):
    from stages.lm.models import load_tokenizer

    return load_tokenizer(chat_model)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same conversations as JSONL (lists), Parquet (list<struct> and JSON text) and CSV (JSON text)."""
    root = tmp_path_factory.mktemp("chats")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    struct = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(pa.table({"messages": pa.array([r["messages"] for r in ROWS], struct), "split": [r["split"] for r in ROWS]}),
                   root / "chat.parquet")  # fmt: skip
    pq.write_table(pa.table({"messages": [json.dumps(r["messages"]) for r in ROWS], "split": [r["split"] for r in ROWS]}),
                   root / "text.parquet")  # fmt: skip
    with open(root / "chat.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "split"])
        w.writerows([json.dumps(r["messages"]), r["split"]] for r in ROWS)
    return root


def _labelled(tok, ids, labels) -> str:
    return tok.decode([i for i, v in zip(ids, labels, strict=True) if v != IGNORE])


# ---- tables ------------------------------------------------------------------------------


def test_every_format_reads_the_same_conversations(tables, tmp_path):
    from stages.config import DataConfig
    from stages.tasks import load_prompts

    hub = tmp_path / "hub"
    hub.mkdir()
    for name, split in (("train", "train"), ("validation", "dev"), ("test", "test")):
        (hub / f"{name}.jsonl").write_text(
            "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in ROWS if r["split"] == split)
        )
    want = [json.loads(m) for m in load_prompt_table(tables / "chat.jsonl").column("messages").to_pylist()]
    assert want == [r["messages"] for r in ROWS]
    for path in ("chat.parquet", "text.parquet", "chat.csv"):
        t = load_prompt_table(tables / path)
        assert [json.loads(m) for m in t.column("messages").to_pylist()] == want, path
        assert t.column("answer").to_pylist() == [final_answer(m) for m in want]
        assert t.column("prompt").to_pylist() == [plain(prompt_turns(m), add_generation_prompt=True) for m in want]
    t, _ = load_prompts(f"hf:{hub}", DataConfig())
    assert [json.loads(m) for m in t.column("messages").to_pylist()] == want
    assert t.column("split").to_pylist() == [r["split"] for r in ROWS]
    # an answer column is the gold answer to score against; the final assistant turn stays the training target
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": MULTI, "answer": "five"}) + "\n")
    assert load_prompt_table(tmp_path / "a.jsonl").column("answer").to_pylist() == ["five"]


BAD = {
    "not a list": ({"role": "user", "content": "hi"}, "must be a list"),
    "not JSON": ("[{'role': 'user'", "not valid JSON"),
    "empty": ([], "is empty"),
    "not an object": (["hi"], "is not a {role, content} object"),
    "unknown role": ([{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}], "has role 'tool'"),
    "empty content": ([{"role": "user", "content": "  "}], "has empty content"),
    "no user turn": ([SYSTEM, {"role": "assistant", "content": "4"}], "no user turn"),
    "late system": ([{"role": "user", "content": "a"}, SYSTEM], "only the first message"),
    "not alternating": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "where assistant was due"),
    "assistant first": ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "where user was due"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_messages_name_the_row(kind):
    value, match = BAD[kind]
    with pytest.raises(DistilError, match="row 7: .*" + match.replace("{", r"\{").replace("}", r"\}")):
        parse_messages(value, "t.jsonl row 7")


def test_malformed_messages_through_the_cli(cli, chat_model, tmp_path):
    out = tmp_path / "out"
    for kind, (value, match) in sorted(BAD.items()):
        path = tmp_path / f"{kind.replace(' ', '_')}.jsonl"
        path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"messages": value, "split": "train"}) + "\n")
        result = cli.fails("generate-teacher-data", "--teacher", chat_model, "--data", path, "--out", out, *GEN, match=match)
        assert f"{path.name} row 1: " in result.output.replace("\n", ""), kind
    bad = tmp_path / "assistant_first.jsonl"
    cli.fails("distill", "--method", "sft", "--data", bad, "--out", out, *LM, match="where user was due")
    cli.fails("evaluate", "--model", chat_model, "--data", bad, "--out", out, match="where user was due")
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "2+2?", **ROWS[0]}) + "\n")
    cli.fails("generate-teacher-data", "--teacher", chat_model, "--data", both, "--out", out, *GEN, match="has both")
    assert not out.exists() and not any(p.name.startswith("out") for p in tmp_path.iterdir())


# ---- templates and the loss mask ---------------------------------------------------------


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    text = render(tok, MULTI, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nAnswer with one number.<|im_end|>\n<|im_start|>user\n1+1?")
    _, spans = assistant_spans(tok, MULTI)
    assert [text[a:b] for a, b in spans] == ["2<|im_end|>", "5<|im_end|>"]
    ids, labels = encode_chat(tok, MULTI, 200)
    assert _labelled(tok, ids, labels) == "2<|im_end|>5<|im_end|>"
    assert tok.decode(ids) == text.rstrip()  # nothing dropped or added between the pieces
    first = labels.index(next(v for v in labels if v != IGNORE))
    assert tok.decode(ids[:first]) == render(tok, MULTI[:2], add_generation_prompt=True)
    last = encode_chat(tok, MULTI, 200, last_only=True)
    assert last[0] == ids and _labelled(tok, *last) == "5<|im_end|>"
    # the final turn's prompt tokenises exactly as the rendered prompt does at inference
    prompt = tok(render(tok, MULTI[:4], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert last[1].index(next(v for v in last[1] if v != IGNORE)) == len(prompt) and last[0][: len(prompt)] == prompt
    cut = encode_chat(tok, MULTI, first + 2)
    assert len(cut[0]) == first + 2 and cut[1][-1] != IGNORE
    with pytest.raises(DistilError, match="beyond the context"):
        encode_chat(tok, MULTI, first)


def test_plain_format_override_and_required(tok):
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    assert render(bare, MULTI[:2], add_generation_prompt=True) == "system: Answer with one number.\nuser: 1+1?\nassistant:"
    ids, labels = encode_chat(bare, MULTI, 200)
    assert _labelled(bare, ids, labels) == " 2</s> 5</s>"  # each assistant turn, eos included, so the model learns to stop
    assert render(tok, MULTI[:2], add_generation_prompt=True, template="plain") == render(
        bare, MULTI[:2], add_generation_prompt=True
    )
    assert render(tok, MULTI[:2], add_generation_prompt=True, template=BRACKETS).endswith("[USER] 1+1?\n[ASSISTANT]")
    assert _labelled(tok, *encode_chat(tok, MULTI, 200, BRACKETS)) == " 2</s> 5</s>"
    assert _labelled(tok, *encode_chat(tok, MULTI, 200, THINK)) == "2<|im_end|>5<|im_end|>"  # located by content
    with pytest.raises(DistilError, match="no chat template"):
        render(bare, MULTI, add_generation_prompt=True, template="required")
    with pytest.raises(DistilError, match="does not parse"):
        install_template(bare, "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(DistilError, match="must be '', required, plain or a Jinja"):
        install_template(bare, "chatml")
    install_template(bare, BRACKETS)
    assert bare.chat_template == BRACKETS and row_prompt(bare, {"messages": json.dumps(MULTI[:2])}).endswith("[ASSISTANT]")
    install_template(bare, "plain")
    assert bare.chat_template is None
    assert row_prompt(bare, {"prompt": "Question: 1+1?\nAnswer:", "messages": None}) == "Question: 1+1?\nAnswer:"


# ---- the commands ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_data(chat_model, tables, tmp_path_factory):
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("chattd")
    Cli(write_params(root)).ok(
        "generate-teacher-data", "--teacher", chat_model, "--data", tables / "chat.jsonl", "--out", root / "td", *GEN
    )
    return root / "td"


def test_teacher_data_stores_rendered_prompts_and_the_conversation(teacher_data, tables, chat_model, tok, cli, tmp_path):
    rows = pq.read_table(teacher_data).to_pylist()
    assert len(rows) == len(ROWS)
    for r in rows:
        turns = prompt_turns(ROWS[r["prompt_id"]]["messages"])
        assert json.loads(r["messages"]) == turns and r["gold"] == final_answer(ROWS[r["prompt_id"]]["messages"])
        assert r["prompt"] == render(tok, turns, add_generation_prompt=True) and r["prompt"].endswith("<|im_start|>assistant\n")
        assert len(r["topk_ids"]) == 4 * len(r["token_ids"])
    for name in ("chat.parquet", "chat.csv"):  # the other formats give the same table
        cli.ok(
            "generate-teacher-data", "--teacher", chat_model, "--data", tables / name, "--out", tmp_path / name, *GEN, *AS_CHAT
        )
        other = pq.read_table(tmp_path / name).to_pylist()
        assert [(r["prompt"], r["messages"], r["completion"]) for r in other] == [
            (r["prompt"], r["messages"], r["completion"]) for r in rows
        ]


def test_sft_on_gold_and_teacher_chats(teacher_data, tables, chat_model, cli, tmp_path):
    from transformers import AutoTokenizer

    cli.ok("distill", "--method", "sft", "--data", tables / "chat.jsonl", "--out", tmp_path / "gold", *LM)
    assert AutoTokenizer.from_pretrained(tmp_path / "gold").chat_template is None  # its own BPE: the plain format
    cli.ok("distill", "--method", "sft", "--data", teacher_data, "--out", tmp_path / "sft", *LM)
    assert AutoTokenizer.from_pretrained(tmp_path / "sft").chat_template == CHATML  # the teacher's tokenizer and template
    cli.ok("distill", "--method", "kd", "--data", teacher_data, "--out", tmp_path / "kd", *LM)  # top-k on the teacher's prompt
    params = tmp_path / "override"
    params.mkdir()
    from conftest import Cli, write_params

    Cli(write_params(params, distill={"lm": {"chat_template": BRACKETS}})).ok(
        "distill", "--method", "sft", "--data", tables / "chat.jsonl", "--out", tmp_path / "brackets", *LM
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "brackets").chat_template == BRACKETS
    for name in ("gold", "sft", "kd", "brackets"):
        assert json.loads((tmp_path / name / "training.json").read_text())["train_rows"] == 16


def test_distill_encodes_chat_rows_with_the_students_template(tok):
    from stages.lm.distill import _encoder
    from stages.tasks.messages import to_json

    gold = {"id": 3, "messages": to_json(MULTI), "prompt": "ignored", "answer": "5"}
    ids, labels, *_ = _encoder(tok, 200, 0, False)(gold)
    assert (ids, labels) == encode_chat(tok, MULTI, 200)
    sample = {"id": 4, "messages": to_json(MULTI[:4]), "prompt": "ignored", "completion": " 7 ", "token_ids": [], "topk_ids": []}
    ids, labels, *_ = _encoder(tok, 200, 0, False)(sample)
    assert _labelled(tok, ids, labels) == "2<|im_end|>7<|im_end|>"
    ids, labels, *_ = _encoder(tok, 200, 0, False, last_only=True)(sample)
    assert _labelled(tok, ids, labels) == "7<|im_end|>"
    unanswered = {"id": 5, "messages": to_json(MULTI[:2]), "prompt": "x", "answer": "2"}  # the answer column closes the turn
    assert _labelled(tok, *_encoder(tok, 200, 0, False)(unanswered)[:2]) == "2<|im_end|>"
    with pytest.raises(DistilError, match="row 3: .*beyond the context"):
        _encoder(tok, 8, 0, False)(gold)


def test_evaluate_renders_with_each_models_template(teacher_data, tables, chat_model, cli, tmp_path, monkeypatch):
    import stages.lm.evaluate as evaluate

    cli.ok("distill", "--method", "sft", "--data", tables / "chat.jsonl", "--out", tmp_path / "plain", *LM)
    seen: list[str] = []
    real = evaluate.sample

    def spy(model, tokenizer, prompts, **kw):
        if kw["max_new_tokens"] == 3:  # the evaluation's greedy pass, not the 2-token warm-up before it
            seen.extend(prompts)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(evaluate, "sample", spy)
    cli.ok("evaluate", "--model", chat_model, "--model", tmp_path / "plain", "--data", tables / "chat.jsonl", "--out", tmp_path / "ev",
           "--set", "max_new_tokens=3")  # fmt: skip
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["teacher"]["rows"] == metrics["plain"]["rows"] == 6
    tests = [r["messages"] for r in ROWS if r["split"] == "test"]
    assert seen[:6] == [CHATML_PROMPT(m) for m in tests]
    assert seen[6:] == [plain(prompt_turns(m), add_generation_prompt=True, eos="</s>") for m in tests]
    seen.clear()
    cli.ok("evaluate", "--model", chat_model, "--data", teacher_data, "--out", tmp_path / "ev2", "--set", "max_new_tokens=3")
    assert seen == [CHATML_PROMPT(m) for m in tests]


def CHATML_PROMPT(messages: list[dict]) -> str:  # noqa: N802  (the ChatML rendering, spelled out)
    turns = prompt_turns(messages)
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns) + "<|im_start|>assistant\n"


def test_required_template_and_bad_override_through_the_cli(tables, teacher_data, cli, tmp_path):
    cli.fails("distill", "--method", "sft", "--data", tables / "chat.jsonl", "--out", tmp_path / "m", *LM,
              "--set", "lm.chat_template=required", match="has no chat template")  # fmt: skip
    cli.fails("distill", "--method", "sft", "--data", tables / "chat.jsonl", "--out", tmp_path / "m", *LM,
              "--set", "lm.chat_template={% if %}", match="does not parse")  # fmt: skip
    cli.fails("distill", "--method", "sft", "--data", teacher_data, "--out", tmp_path / "m", *LM, "--set", "demos=1",
              match="holds chats")  # fmt: skip
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


# ---- a served teacher ----------------------------------------------------------------------


def test_served_teacher_renders_locally_or_through_the_chat_api(chat_model, tok, tables, cli, tmp_path):
    from loopback import serving

    from stages.config import ServeConfig, TeacherConfig
    from stages.lm.serve import build_app
    from stages.lm.teachers import open_teacher

    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"messages": r["messages"][-2:], "split": r["split"]}) + "\n" for r in ROWS[:8]))
    engine = open_teacher(chat_model, TeacherConfig(), "cpu")
    with serving(build_app(engine, ServeConfig(batch_wait_ms=1.0), "tiny")) as base:
        url = f"{base}/v1"
        cli.fails("generate-teacher-data", "--teacher", url, "--data", single, "--out", tmp_path / "x", *GEN,
                  match="set teacher.tokenizer")  # fmt: skip
        cli.fails("generate-teacher-data", "--teacher", url, "--data", tables / "chat.jsonl", "--out", tmp_path / "x", *GEN,
                  "--set", "teacher.api=chat", match="sends each prompt as one user message")  # fmt: skip
        cli.ok("generate-teacher-data", "--teacher", url, "--data", single, "--out", tmp_path / "completions", *GEN,
               "--set", f"teacher.tokenizer={chat_model}")  # fmt: skip
        cli.ok("generate-teacher-data", "--teacher", url, "--data", single, "--out", tmp_path / "chat", *GEN,
               "--set", "teacher.api=chat", "--set", f"teacher.tokenizer={chat_model}")  # fmt: skip
    assert not (tmp_path / "x").exists()
    local = pq.read_table(tmp_path / "completions").to_pylist()
    served = pq.read_table(tmp_path / "chat").to_pylist()
    assert [r["prompt"] for r in local] == [render(tok, json.loads(r["messages"]), add_generation_prompt=True) for r in local]
    # the server's own template on the one user message gives the same greedy completions as the local rendering
    assert [r["completion"] for r in served] == [r["completion"] for r in local]
    assert [r["prompt"] for r in served] == [r["prompt"] for r in local]
