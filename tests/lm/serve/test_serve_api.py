"""`distil serve`'s HTTP API against a real uvicorn server on 127.0.0.1 (httpx): greedy
answers equal the engine's, batching, the concurrency limit, the validation matrix, stop
strings, streamed completions, exact log-probs of sampled tokens, the cascade extension."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from loopback import serving
from serve_helpers import CascadeLike, Slow, engine, open_engine, serve_config, tiny_lm  # noqa: F401  (engine: a fixture)

from stages.lm.serve import build_app
from stages.lm.serve.protocol import ChatMessage, chat_prompt
from stages.lm.serve.tokens import cut_at_stop, offsets, pieces
from stages.lm.teachers.base import Sampling
from stages.lm.teachers.vocabulary import tokenizer_fingerprint

PROMPTS = [f"Question: {a} + {b}\nAnswer:" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 0), (2, 2), (0, 5)]]
NAME = "tiny"


@pytest.fixture(scope="module")
def base(engine):
    with serving(build_app(engine, serve_config(max_tokens=32, max_logprobs=5), NAME)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client


def _ok(http, path: str, body: dict) -> dict:
    r = http.post(path, json={"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_models(http, engine):
    assert http.get("/health").json()["status"] == "ok"
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [NAME]
    card = listing["data"][0]
    assert card["object"] == "model" and card["tokenizer"] == tokenizer_fingerprint(engine.tokenizer)
    assert card["max_model_len"] == engine.context == 64


def test_greedy_completions_equal_engine_generate(http, engine):
    direct = engine.generate(PROMPTS[:3], 1, Sampling(temperature=0, max_new_tokens=8, top_k=1))
    body = _ok(http, "/v1/completions", {"prompt": PROMPTS[:3], "max_tokens": 8, "temperature": 0, "logprobs": 1,
                                         "return_tokens_as_token_ids": True})  # fmt: skip
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, row in zip(body["choices"], direct, strict=True):
        assert choice["text"] == row.text
        assert [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]] == row.token_ids
        assert choice["finish_reason"] == row.finish_reason
    prompt_tokens = sum(len(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS[:3])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(r.token_ids) for r in direct),
                             "total_tokens": prompt_tokens + sum(len(r.token_ids) for r in direct)}  # fmt: skip
    assert len({r.text for r in direct}) > 1, "the tiny model should answer prompts differently"


def test_concurrent_requests_share_engine_calls(engine, http):
    alone = [
        _ok(http, "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0})["choices"][0]["text"] for p in PROMPTS
    ]
    with (
        serving(build_app(engine, serve_config(batch_wait_ms=400), NAME)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        texts: dict[int, str] = {}

        def ask(i: int) -> None:
            r = client.post("/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": 6, "temperature": 0})
            texts[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        health = client.get("/health").json()
    assert [texts[i] for i in range(len(PROMPTS))] == alone
    assert health["requests"] == len(PROMPTS) and health["prompts"] == len(PROMPTS)
    assert health["batches"] < len(PROMPTS), health


def test_a_request_beyond_max_concurrency_gets_429(engine):
    slow = Slow(engine, 1.0)
    with serving(build_app(slow, serve_config(max_concurrency=1), NAME)) as url, httpx.Client(base_url=url, timeout=30) as client:
        first: dict = {}
        thread = threading.Thread(
            target=lambda: first.update(r=client.post("/v1/completions", json={"prompt": "1", "max_tokens": 2}))
        )
        thread.start()
        deadline = time.monotonic() + 10
        while slow.started == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "1"}], "max_tokens": 2})
        assert client.get("/health").status_code == 200  # reads are not limited
        thread.join(30)
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_exceeded" and "max_concurrency" in second.json()["error"]["message"]
    assert first["r"].status_code == 200


CHAT = {"messages": [{"role": "user", "content": "Question: 1 + 2\nAnswer:"}]}
BAD = [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [100000]}, "prompt"),
    ("/v1/completions", {"prompt": "1", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "1", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "1", "max_tokens": 33}, "max_tokens"),
    ("/v1/completions", {"prompt": "1", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 50, "max_tokens": 20}, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 65, "max_tokens": 0, "echo": True}, "prompt"),
    ("/v1/completions", {"prompt": "1", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "1", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "1", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "1", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "1", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "1", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "1", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "1", "seed": -3}, "seed"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 9}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 40}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD, ids=[f"{p.split('/')[-1]}-{param}-{i}" for i, (p, _, param) in enumerate(BAD)]
)
def test_bad_fields_get_400_with_the_openai_error_body(http, path, body, param):
    r = http.post(path, json={"model": NAME, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_models_routes_and_bodies(http):
    r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "gpt-9" in r.json()["error"]["message"]
    r = http.get("/v1/engines")
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body must be a JSON object"


def test_stop_string_cuts_the_completion(http):
    full = _ok(http, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0})["choices"][0]
    stop = full["text"][3:5]
    assert len(stop) == 2
    body = _ok(http, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stop": [stop, "never seen"],
                                         "logprobs": 1})  # fmt: skip
    choice = body["choices"][0]
    assert choice["text"] == full["text"][: full["text"].find(stop)] and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["tokens"]) == body["usage"]["completion_tokens"] < 12
    assert all(o < len(choice["text"]) for o in choice["logprobs"]["text_offset"])


def test_streamed_completions_add_up_to_the_text(http):
    body = {"prompt": PROMPTS[4], "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True, "n": 2}
    whole = _ok(http, "/v1/completions", body)
    with http.stream("POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"] and choice["text"].startswith(PROMPTS[4])
        assert [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
        assert [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]] == choice["logprobs"]["text_offset"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_sampled_tokens_get_their_exact_logprobs_and_seeds_repeat(http, engine):
    body = {
        "prompt": PROMPTS[2],
        "max_tokens": 10,
        "temperature": 1.5,
        "logprobs": 1,
        "seed": 11,
        "return_tokens_as_token_ids": True,
    }
    scores = http.get("/health").json()["scores"]
    first, again = _ok(http, "/v1/completions", body), _ok(http, "/v1/completions", body)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    lp = first["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    tops = [int(next(iter(d)).removeprefix("token_id:")) for d in lp["top_logprobs"]]
    assert ids != tops, "every sampled token was the top-1: the scoring path is not exercised"
    assert http.get("/health").json()["scores"] == scores + 2  # outside the stored top-1: scored by the engine
    prompt = engine.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    scored = engine.score([prompt], [ids], 1)[0]
    np.testing.assert_allclose(lp["token_logprobs"], scored.logprobs, rtol=1e-5)
    assert all(lp_t <= max(d.values()) + 1e-6 for lp_t, d in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True))


def test_a_cascade_engine_adds_distil_and_refuses_to_score(engine):
    with serving(build_app(CascadeLike(engine), serve_config(), NAME)) as url, httpx.Client(base_url=url, timeout=30) as client:
        done = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}).json()
        chat = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "temperature": 0}).json()
        scoring = client.post("/v1/completions", json={"prompt": [5, 6, 7], "echo": True, "max_tokens": 0, "logprobs": 2})
    assert done["choices"][0]["distil"] == {"route": "student", "cost": 1.5}
    assert chat["choices"][0]["distil"] == {"route": "student", "cost": 1.5}
    assert scoring.status_code == 400 and "cannot score" in scoring.json()["error"]["message"]


def test_chat_prompt_rule(engine):
    messages = [ChatMessage(role="system", content="Add."), ChatMessage(role="user", content="1 + 2")]
    assert chat_prompt(engine.tokenizer, messages) == "Add.\n1 + 2"  # no chat template: contents joined
    tok = engine.tokenizer.__class__.from_pretrained(engine.identity["path"])
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tok, messages) == "<system>Add.<user>1 + 2<assistant>"


def test_pieces_offsets_and_stop(engine):
    tok = engine.tokenizer
    text = "café 12 + 3 — ünï"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    parts = pieces(tok, ids, text, skip_special=True)
    assert len(parts) == len(ids) and "".join(parts) == text
    assert offsets(["ab", "", "c"], 5) == [5, 7, 7]
    assert cut_at_stop("12 + 3", ["1", "2", " +", " 3"], ["+"]) == ("12 ", ["1", "2", " "])
    assert cut_at_stop("12", ["1", "2"], ["x"]) is None
