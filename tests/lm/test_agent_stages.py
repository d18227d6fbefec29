"""Agent distillation through the commands: gold rows written out as trajectories or chains of
thought (``data.target``), teacher data whose samples are trajectories (``agent.tool`` on
``generate-teacher-data``), students that learn them with the observations masked, and
``evaluate`` running each model as an agent, scoring its final answer and counting tool calls.

Models that must behave a known way are scripted at the decoding call (``model_completer`` /
the teacher's ``generate``): a tool user that writes the right code, one that writes wrong
code, and one that ignores the tool. One chain runs on real tiny models end to end."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stages.artifacts import read_manifest
from stages.lm.agent.sandbox import run as run_tool
from stages.lm.agent.trajectory import OBSERVATION, answer_of, code_of, expression

SMALL = {"min_terms": 2, "max_terms": 3, "min_digits": 3, "max_digits": 4}
DATA = ["--set", "data.sizes=[40,8,12]", "--set", f"data.task_options={json.dumps(SMALL)}"]
LM = ["--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2", "--set", "lm.vocab_size=512",
      "--set", "lm.context=128", "--set", "batch_size=8", "--set", "lr=0.01", "-q"]  # fmt: skip
AGENT = ["--set", "agent.tool=python", "--set", "agent.seconds=1"]


def tool_user(offset: int = 0, *, use_tool: bool = True):
    """``complete`` of a scripted agent: it thinks, writes ``print(<the question's sum> + offset)``
    and keeps writing past the stop string (a model does not know where the tool takes over),
    then answers with the last observation; without the tool it answers 0 at once."""

    def complete(texts, n, temperature, max_new_tokens):
        out = []
        for t in texts:
            if "Thought:" not in t:  # the first round: the prompt alone
                reply = (f" Thought: the tool adds\nCode: print({expression(t)} + {offset})\n{OBSERVATION} 12 (made up)\nAnswer: 3"
                         if use_tool else " Thought: easy\nAnswer: 0\n")  # fmt: skip
            elif t.endswith("Answer:"):  # asked for the answer after the last call
                seen = [line.split(":", 1)[1].strip() for line in t.splitlines() if line.startswith(OBSERVATION)]
                reply = f" {seen[-1] if seen else 0}\nQuestion: more"
            else:
                reply = "Answer: " + t.rsplit(OBSERVATION, 1)[1].split("\n")[0].strip() + "\n"
            out += [reply] * n
        return out

    return complete


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A teacher trained on gold trajectories, its agent teacher data, and an sft student of it."""
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("agent")
    cli = Cli(write_params(root))
    cli.ok("distill", "--method", "sft", "--data", "chain_sum", "--out", root / "teacher", "--set", "data.target=agent",
           "--set", "steps=150", *DATA, *LM)  # fmt: skip
    cli.ok("generate-teacher-data", "--teacher", root / "teacher", "--data", "chain_sum", "--out", root / "td",
           "--set", "samples=2", "--set", "temperature=0.7", "--set", "max_new_tokens=8", "--set", "splits=[train,dev]",
           *DATA, *AGENT)  # fmt: skip
    cli.ok("distill", "--method", "sft", "--data", root / "td", "--out", root / "student", "--set", "steps=10", *LM)
    return root, cli


def test_gold_rows_become_trajectories_or_chains_of_thought_with_data_target(tmp_path):
    from stages.config import DataConfig
    from stages.lm import distill

    for target, marker in (("agent", "Code: print("), ("cot", " = ")):
        cfg = DataConfig(sizes=[10, 2, 2], task_options=SMALL, target=target)
        rows = distill._prompt_sources(distill.DistillConfig(method="sft"), "chain_sum", cfg)["train"][0][0]()
        assert len(rows) == 10
        for r in rows:
            assert marker in r["completion"] and answer_of(r["completion"]) == str(r["answer"])
            assert r["trajectory"] == (target == "agent")


def test_data_target_on_questions_without_a_sum_is_refused(cli, tmp_path):
    cli.fails("distill", "--method", "sft", "--data", "letter_counting", "--out", tmp_path / "m", "--set", "data.target=agent",
              "--set", "data.sizes=[10,2,2]", *LM, match="data.target=agent needs questions that end in a sum")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_agent_teacher_data_holds_trajectories_whose_observations_the_tool_wrote(chain):
    root, _ = chain
    manifest = read_manifest(root / "td")
    assert manifest["agent"]["tool"] == "python" and manifest["tokens"] == "text" and manifest["top_k"] == 0
    rows = pq.read_table(root / "td").to_pylist()
    assert len(rows) == 2 * 48
    for r in rows:
        text = r["completion"]
        assert r["token_ids"] == [] and r["answer"] == answer_of(text)
        lines = text.splitlines()
        for i, line in enumerate(lines):  # every observation is the sandbox's output for the code line before it
            if line.startswith(OBSERVATION):
                code = code_of("\n".join(lines[:i]))
                assert line[len(OBSERVATION) :].strip() == run_tool(code).text.strip().replace("\n", " ")
        assert text.count(OBSERVATION) <= 2  # agent.max_calls


def test_a_student_learns_agent_data_with_the_observations_masked(chain):
    from stages.lm.distill import _as_trajectories, _encoder, _part_loader
    from stages.lm.models import load_tokenizer

    root, _ = chain
    tok = load_tokenizer(root / "student")
    part = sorted((root / "td").glob("part-*.parquet"))[0]
    rows = _as_trajectories(_part_loader)(part, "train")()
    with_obs = next(r for r in rows if OBSERVATION in r["completion"])
    ids, labels, *_ = _encoder(tok, 128, 0, False)(with_obs)
    observed = with_obs["completion"].split(OBSERVATION, 1)[1].split("\n")[0].strip()
    masked = tok.decode([t for t, y in zip(ids, labels, strict=True) if y == -100])
    assert observed.replace(" ", "") in masked.replace(" ", "")
    assert json.loads((root / "student" / "training.json").read_text())["train_rows"] > 0


@pytest.mark.parametrize(("offset", "use_tool", "accuracy", "calls"), [(0, True, 1.0, 1.0), (1, True, 0.0, 1.0), (0, False, 0.0, 0.0)])
def test_evaluate_as_agent_scores_the_final_answer_and_counts_tool_calls(chain, tmp_path, monkeypatch, offset, use_tool,
                                                                          accuracy, calls):  # fmt: skip
    import stages.lm.agent.runner as runner

    root, cli = chain
    monkeypatch.setattr(runner, "model_completer", lambda *a, **k: tool_user(offset, use_tool=use_tool))
    cli.ok("evaluate", "--model", root / "student", "--data", "chain_sum", "--out", tmp_path / "ev", *DATA, *AGENT)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["student"]
    assert m["accuracy"] == accuracy and m["tool_calls"] == calls and m["tool_error_share"] == 0.0 and m["rows"] == 12


def test_self_consistent_actions_outvote_a_wrong_candidate(chain, tmp_path, monkeypatch):
    """Three code candidates per call, one of them wrong: the majority observation is kept."""
    import stages.lm.agent.runner as runner

    root, cli = chain
    right, wrong = tool_user(0), tool_user(7)

    def complete(texts, n, temperature, max_new_tokens):
        if n == 1:
            return right(texts, 1, temperature, max_new_tokens)
        out = []
        for t in texts:
            out += right([t], 2, temperature, max_new_tokens) + wrong([t], 1, temperature, max_new_tokens)
        return out

    monkeypatch.setattr(runner, "model_completer", lambda *a, **k: complete)
    cli.ok("evaluate", "--model", root / "student", "--data", "chain_sum", "--out", tmp_path / "ev", *DATA, *AGENT,
           "--set", "agent.samples=3")  # fmt: skip
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["student"]
    assert m["accuracy"] == 1.0 and m["agent_samples"] == 3


def test_first_thought_prefix_starts_every_trajectory(monkeypatch):
    from stages.config import AgentConfig
    from stages.lm.agent.runner import Decoder, solve

    seen = []

    def complete(texts, n, temperature, max_new_tokens):
        seen.extend(texts)
        return [" I will add them\nCode: print(1)" if t.endswith("Thought:") else "Answer: 1\n" for t in texts for _ in range(n)]

    cfg = AgentConfig(tool="python", first_thought=True, max_calls=1)
    (t,) = solve(Decoder(complete, cfg, 0.0, 4), ["Question: 1 + 0 =\nAnswer:"], cfg)
    assert seen[0].endswith(" Thought:") and t.text.startswith(" Thought: I will add them\n")
    assert seen[1].endswith("Thought: I will add them\n")  # the agent continues from the prefix


def test_agent_mode_refuses_settings_it_cannot_honour(chain, tmp_path):
    root, cli = chain
    cli.fails("evaluate", "--model", root / "student", "--data", "chain_sum", "--out", tmp_path / "ev", *DATA, *AGENT,
              "--set", "samples=4", match="agent mode")  # fmt: skip
    cli.fails("evaluate", "--model", root / "student", "--data", "chain_sum", "--out", tmp_path / "ev", *DATA,
              "--set", "agent.tool=shell", match="agent.tool")  # fmt: skip
    assert not (tmp_path / "ev").exists()
