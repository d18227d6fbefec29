"""Teachers anywhere, end to end through the CLI: a tiny LM behind `distil serve`'s app on
127.0.0.1 is the teacher of generate-teacher-data, on-policy distillation and cascades,
and gives what the same model gives in process; a cascade served from its policy file
decides as the offline run did."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.config import ServeConfig, TeacherConfig
from stages.lm.serve.app import build_app
from stages.lm.teachers import open_teacher
from tests.loopback import free_port, serving

LM = ["--set", "data.sizes=[120,20,30]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip
GREEDY = ["--set", "data.sizes=[120,20,30]", "--set", "samples=1", "--set", "temperature=0", "--set", "top_k=5",
          "--set", "max_new_tokens=4", "--set", "shard_prompts=32", "-q"]  # fmt: skip
SECRET = "sk-distil-test-secret-0123"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher (sft, 4 epochs) and a weaker student (1 epoch) on basic_arithmetic."""
    from conftest import Cli, write_params

    root = tmp_path_factory.mktemp("served")
    c = Cli(write_params(root))
    c.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "teacher", "--set", "epochs=4", *LM)
    c.ok("distill", "--method", "sft", "--data", "basic_arithmetic", "--out", root / "student", "--set", "epochs=1", *LM)
    return {"root": root, "teacher": root / "teacher", "student": root / "student"}


@pytest.fixture(scope="module")
def server(models):
    """The teacher behind the OpenAI-compatible app; yields (base URL, the app's batcher)."""
    engine = open_teacher(models["teacher"], TeacherConfig(), torch.device("cpu"))
    app = build_app(engine, ServeConfig(batch_wait_ms=2.0), "teacher")
    with serving(app) as base:
        yield f"{base}/v1", app.state.batcher
    engine.close()


@pytest.fixture(scope="module")
def local_data(models):
    from conftest import Cli, write_params

    out = models["root"] / "td_local"
    Cli(write_params(models["root"])).ok("generate-teacher-data", "--teacher", models["teacher"], "--data", "basic_arithmetic",
                                         "--out", out, *GREEDY)  # fmt: skip
    return out


def _gen(cli, server_url, out, *extra):
    return cli.ok("generate-teacher-data", "--teacher", server_url, "--data", "basic_arithmetic", "--out", out, *GREEDY, *extra)


def test_http_teacher_data_equals_in_process_teacher_data(cli, models, server, local_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    _gen(cli, server[0], tmp_path / "td", "--set", f"teacher.tokenizer={models['teacher']}")
    got, want = pq.read_table(tmp_path / "td").to_pylist(), pq.read_table(local_data).to_pylist()
    assert len(got) == len(want) > 50
    for g, w in zip(sorted(got, key=lambda r: r["id"]), sorted(want, key=lambda r: r["id"]), strict=True):
        assert g["token_ids"] == w["token_ids"] and g["completion"] == w["completion"]
        np.testing.assert_allclose(np.float32(g["topk_logprobs"]), np.float32(w["topk_logprobs"]), atol=2e-2)
        top_g, top_w = np.reshape(g["topk_ids"], (-1, 5)), np.reshape(w["topk_ids"], (-1, 5))
        assert (top_g[:, 0] == top_w[:, 0]).all()  # the teacher's best token at every position
        assert g["finish_reason"] in ("stop", "length") and g["prompt_tokens"] > 0 and g["completion_tokens"] == len(g["token_ids"])
    manifest = json.loads((tmp_path / "td" / ".manifest.json").read_text())
    assert manifest["model"]["backend"] == "http" and manifest["tokens"] == "ids" and manifest["top_k"] == 5
    assert manifest["usage"]["completion_tokens"] == sum(len(r["token_ids"]) for r in got)
    for f in (tmp_path / "td").rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f"the API key leaked into {f}"


def test_without_a_local_tokenizer_teacher_data_is_text_for_sft_only(cli, server, tmp_path):
    _gen(cli, server[0], tmp_path / "td")
    manifest = json.loads((tmp_path / "td" / ".manifest.json").read_text())
    table = pq.read_table(tmp_path / "td").to_pylist()
    assert manifest["tokens"] == "text" and "teacher.tokenizer" in manifest["text_only"] and manifest["top_k"] == 0
    assert all(r["token_ids"] == [] and r["completion"] for r in table)
    cli.fails("distill", "--method", "kd", "--data", tmp_path / "td", "--out", tmp_path / "kd", *LM, match="holds the teacher's text only")
    cli.ok("distill", "--method", "sft", "--data", tmp_path / "td", "--out", tmp_path / "sft", "--set", "epochs=1", *LM)
    assert not (tmp_path / "kd").exists()


def test_on_policy_scores_the_students_samples_through_the_server(cli, models, server, tmp_path):
    scored_before = server[1].scores
    cli.ok("distill", "--method", "on-policy", "--teacher", server[0], "--data", "basic_arithmetic", "--out", tmp_path / "s",
           "--set", "epochs=1", "--set", "lmbda=0.5", "--set", "lm.max_new_tokens=4", "--set", f"teacher.tokenizer={models['teacher']}",
           "--set", "teacher.top_k=5", *LM)  # fmt: skip
    summary = json.loads((tmp_path / "s" / "training.json").read_text())
    assert summary["method"] == "on-policy" and np.isfinite(summary["history"][-1]["train_loss"])
    assert server[1].scores > scored_before  # the teacher's log-probs came over HTTP
    cli.fails("distill", "--method", "on-policy", "--teacher", server[0], "--data", "basic_arithmetic", "--out", tmp_path / "x",
              *LM, match="teacher.tokenizer")  # fmt: skip


def test_served_scoring_equals_in_process_scoring(models, server):
    from stages.lm.teachers.http import HTTPTeacher

    local = open_teacher(models["teacher"], TeacherConfig(), torch.device("cpu"))
    remote = HTTPTeacher(server[0], TeacherConfig(tokenizer=str(models["teacher"])))
    ids = local.tokenizer(["Question: 3 + 4\nAnswer: 7", "Question: 1 + 1\nAnswer: 2"], add_special_tokens=False)["input_ids"]
    prompts, completions = [i[:-2] for i in ids], [i[-2:] for i in ids]
    for a, b in zip(local.score(prompts, completions, 4), remote.score(prompts, completions, 4), strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-3)
        assert (a.topk_ids[:, 0] == b.topk_ids[:, 0]).all()


def test_an_unreachable_teacher_is_one_line_and_leaves_nothing(cli, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cli.fails("generate-teacher-data", "--teacher", url, "--data", "basic_arithmetic", "--out", tmp_path / "td", *GREEDY,
              "--set", "teacher.retries=1", "--set", "teacher.backoff=0.01", match=url)  # fmt: skip
    assert not (tmp_path / "td").exists()


def test_a_wrong_model_name_is_refused_before_any_work(cli, server, tmp_path):
    cli.fails("generate-teacher-data", "--teacher", server[0], "--data", "basic_arithmetic", "--out", tmp_path / "td", *GREEDY,
              "--set", "teacher.model=gpt-9", match="teacher.model")  # fmt: skip
    assert not (tmp_path / "td").exists()


CASCADE = ["--set", "policy=sc-cascade", "--set", "samples=3", "--set", "temperature=1.0", "--set", "max_new_tokens=4",
           "--set", "margin=0.0", "--set", "confidence=0", "--set", "seed_per_query=true", "-q"]  # fmt: skip


def _decisions(path):
    return {r["id"]: r for r in pq.read_table(path / "decisions").to_pylist()}


def test_a_cascade_with_a_served_teacher_decides_as_with_the_local_one(cli, models, server, local_data, tmp_path):
    prices = '--set=costs={student: {input: 0.1, output: 0.2}, teacher: {input: 1.0, output: 2.0}}'
    base = ["cascade", "--student", models["student"], "--data", local_data, *CASCADE, prices]
    cli.ok(*base, "--teacher", models["teacher"], "--out", tmp_path / "local")
    cli.ok(*base, "--teacher", server[0], "--out", tmp_path / "http", "--set", f"teacher.tokenizer={models['teacher']}")
    local, http = _decisions(tmp_path / "local"), _decisions(tmp_path / "http")
    assert local.keys() == http.keys()
    assert [(r["route"], r["answer"], r["cost"]) for r in local.values()] == [(r["route"], r["answer"], r["cost"]) for r in http.values()]
    cli.fails(*base[:-1], "--teacher", server[0], "--out", tmp_path / "flops", match="price every model")


def test_a_served_cascade_decides_each_query_as_the_offline_run(cli, models, local_data, tmp_path):
    from openai import OpenAI

    from stages.lm.serve.cascade import CascadeEngine

    cli.ok("cascade", "--student", models["student"], "--teacher", models["teacher"], "--data", local_data, "--out", tmp_path / "c",
           *CASCADE, "--set", "threshold=0.6", "--set", "temperature=0.1")  # fmt: skip
    offline = _decisions(tmp_path / "c")
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert 0 < metrics["teacher_rate"] < 1, "the pair must defer some queries and keep others for the test to mean anything"
    prompts = {r["prompt_id"]: r["prompt"] for r in pq.read_table(local_data).to_pylist() if r["split"] == "test"}
    engine = CascadeEngine(tmp_path / "c" / "policy.json", models["student"], models["teacher"], torch.device("cpu"))
    with serving(build_app(engine, ServeConfig(batch_wait_ms=2.0), "cascade")) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        for qid, want in offline.items():
            got = client.completions.create(model="cascade", prompt=prompts[qid], max_tokens=4)
            info = got.choices[0].model_extra["distil"]
            assert info["route"] == want["route"], qid
            from stages.tasks.reasoning import extract_answer

            assert extract_answer(got.choices[0].text)[0] == want["answer"], qid
            assert info["cost"] == pytest.approx(want["cost"], rel=1e-9)
    engine.close()


def test_a_served_cascade_refuses_a_policy_for_other_models(models, local_data, tmp_path, cli):
    from stages.errors import DistilError
    from stages.lm.serve.cascade import CascadeEngine

    cli.ok("cascade", "--student", models["student"], "--teacher", models["teacher"], "--data", local_data, "--out", tmp_path / "c",
           *CASCADE)  # fmt: skip
    with pytest.raises(DistilError, match="calibrated for student"):
        CascadeEngine(tmp_path / "c" / "policy.json", models["teacher"], models["teacher"], torch.device("cpu"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DistilError, match="not a cascade policy file"):
        CascadeEngine(tmp_path / "bad.json", models["student"], models["teacher"], torch.device("cpu"))


def test_the_chat_api_gives_the_same_teacher_data(cli, models, server, local_data, tmp_path):
    _gen(cli, server[0], tmp_path / "td", "--set", f"teacher.tokenizer={models['teacher']}", "--set", "teacher.api=chat")
    got, want = pq.read_table(tmp_path / "td").to_pylist(), pq.read_table(local_data).to_pylist()
    assert [r["token_ids"] for r in sorted(got, key=lambda r: r["id"])] == [r["token_ids"] for r in sorted(want, key=lambda r: r["id"])]


def test_a_client_killed_mid_run_resumes_without_duplicates_or_loss(models, local_data, tmp_path):
    """SIGKILL of `distil generate-teacher-data` talking to a slow server once a part is on
    disk; the rerun asks only for the missing parts and ends with what a clean run has."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT, Cli, write_params

    from tests.lm.serve.serve_helpers import Slow

    params = write_params(tmp_path)
    engine = Slow(open_teacher(models["teacher"], TeacherConfig(), torch.device("cpu")), 0.4)
    app = build_app(engine, ServeConfig(batch_wait_ms=2.0), "teacher")
    out, args = tmp_path / "td", ["--data", "basic_arithmetic", *GREEDY, "--set", "shard_prompts=16",
                                  "--set", f"teacher.tokenizer={models['teacher']}", "--params", str(params)]  # fmt: skip
    with serving(app) as base:
        cmd = [sys.executable, "-m", "distilcli", "generate-teacher-data", "--teacher", f"{base}/v1", "--out", str(out), *args]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while not list((tmp_path / "td.partial").glob("part-*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        done_before = len(list((tmp_path / "td.partial").glob("part-*.parquet")))
        assert 1 <= done_before < 7 and not out.exists()
        before = app.state.batcher.prompts
        Cli(params).ok("generate-teacher-data", "--teacher", f"{base}/v1", "--out", out, *args[:-2])
        asked_again = app.state.batcher.prompts - before
    got, want = pq.read_table(out).to_pylist(), pq.read_table(local_data).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want)  # none lost, none twice
    assert {r["id"]: r["token_ids"] for r in got} == {r["id"]: r["token_ids"] for r in want}
    assert asked_again == len(want) - 16 * done_before  # the rerun asked only for the parts it did not have


def test_a_failing_server_stops_after_its_retries_with_one_line(cli, tmp_path):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app, hits = FastAPI(), {"n": 0}

    @app.get("/v1/models")
    def models_():
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.post("/v1/completions")
    def broken():
        hits["n"] += 1
        return JSONResponse({"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}, 503)

    with serving(app) as base:
        cli.fails("generate-teacher-data", "--teacher", f"{base}/v1", "--data", "basic_arithmetic", "--out", tmp_path / "td", *GREEDY,
                  "--set", "teacher.retries=2", "--set", "teacher.backoff=0.01", "--set", "teacher.concurrency=1",
                  match="after 2 retries")  # fmt: skip
    assert hits["n"] == 3 and not (tmp_path / "td").exists()


def test_a_named_endpoint_in_params_stands_for_its_url_and_model(cli, models, server, local_data, tmp_path):
    endpoint = f"--set=teacher.endpoints={{big: {{url: '{server[0]}', model: teacher}}}}"
    _gen(cli, "big", tmp_path / "td", endpoint, "--set", f"teacher.tokenizer={models['teacher']}")
    manifest = json.loads((tmp_path / "td" / ".manifest.json").read_text())
    assert manifest["teachers"][0]["url"] == server[0] and manifest["teachers"][0]["model"] == "teacher"
    assert pq.read_table(tmp_path / "td").num_rows == pq.read_table(local_data).num_rows
    cli.fails("generate-teacher-data", "--teacher", "big", "--data", "basic_arithmetic", "--out", tmp_path / "x", *GREEDY,
              "--set=teacher.endpoints={big: {url: nowhere}}", match="teacher.endpoints.big")  # fmt: skip


def test_a_server_without_logprobs_asked_for_top_k_is_refused(cli, models, tmp_path):
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models_():
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.post("/v1/completions")
    def plain(body: dict):
        n = body.get("n", 1)
        return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": i, "text": " 7", "logprobs": None, "finish_reason": "stop"} for i in range(n)],
                "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}  # fmt: skip

    with serving(app) as base:
        cli.fails("generate-teacher-data", "--teacher", f"{base}/v1", "--data", "basic_arithmetic", "--out", tmp_path / "td", *GREEDY,
                  "--set", f"teacher.tokenizer={models['teacher']}", match="returned no logprobs")  # fmt: skip
        assert not (tmp_path / "td").exists()
        _gen(cli, f"{base}/v1", tmp_path / "text", "--set", "top_k=0")  # text only is what such a server can give
    assert {r["completion"] for r in pq.read_table(tmp_path / "text").to_pylist()} == {" 7"}
