"""The HTTP teacher against a fake OpenAI-compatible server on 127.0.0.1: both response
formats (completions, chat), with and without vLLM's ``token_id:N`` tokens, top-k parsing,
tokenizer checks, model selection and echoed scoring. ``FakeOpenAI`` is shared with
test_http_faults.py, which adds the faults.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import numpy as np
import pytest
from fastapi import FastAPI, Request
from loopback import serving

from stages.config import TeacherConfig
from stages.errors import DistilError
from stages.lm.models import train_tokenizer
from stages.lm.teachers import Teacher, open_teacher
from stages.lm.teachers.base import Sampling
from stages.lm.teachers.http import HTTPTeacher
from stages.lm.teachers.vocabulary import tokenizer_fingerprint

CORPUS = [f"Question: {a} + {b}\nAnswer: {a + b}" for a in range(12) for b in range(12)]
TEXTS = [" 12", " 3 + 4 = 7", " Answer: 5"]
"""what the fake server 'generates': choice j of a request with seed s says TEXTS[(s + j) % 3]"""


def token_lp(t: int) -> float:
    """The fake model's log-prob of the token it generates at position t."""
    return -0.05 - 0.01 * t


def score_lp(pos: int, token: int) -> float:
    """The fake model's log-prob of a given token at position pos of a scored sequence."""
    return -0.3 - 0.01 * pos - 0.001 * token


class FakeOpenAI:
    """A canned OpenAI-compatible server (FastAPI) behind a fault switch: ``state`` holds what
    it saw (posts, bodies, auth headers, most requests in flight) and how to misbehave."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        strings = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
        count = Counter(strings)
        self.pool = [i for i, s in enumerate(strings) if count[s] == 1 and s.isascii() and s.strip()]
        self.active, self.last_seen = 0, 0.0
        self.reset()
        self.app = self._faulty(self._api())

    def reset(self) -> None:
        """Wait for the server to go quiet, then forget what it saw. A test that gives up on its
        requests (a cancelled batch) leaves some in the socket; counted after the reset, they
        would land in the next test's ``posts``."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (self.active or time.monotonic() - self.last_seen < 0.2):
            time.sleep(0.02)
        self.state = {
            "models": [{"id": "tiny", "object": "model", "owned_by": "test", "max_model_len": 128}],
            "key": None, "faults": [], "always": None, "posts": 0, "bodies": [], "auth": [], "inflight": 0,
            "max_inflight": 0, "delay": 0.0, "topk_cap": None, "no_logprobs": False, "tamper": None, "score_format": "echo",
        }  # fmt: skip

    # what the fake model says
    def completion_ids(self, seed: int, j: int, max_tokens: int) -> tuple[list[int], str, str]:
        ids = self.tok(TEXTS[(seed + j) % len(TEXTS)], add_special_tokens=False)["input_ids"]
        if j % 2:
            ids = [*ids, self.tok.eos_token_id]  # ends on eos; the text leaves it out, as vLLM's does
        ids = ids[:max_tokens]
        finish = "stop" if ids[-1] == self.tok.eos_token_id or len(ids) < max_tokens else "length"
        return ids, self.tok.decode(ids, skip_special_tokens=True), finish

    def alternatives(self, chosen: int, t: int, k: int) -> list[tuple[int, float]]:
        """k alternatives, the generated token first (best), given worst first: the client sorts."""
        others = [p for p in self.pool if p != chosen]
        start = (chosen * 7 + t) % len(others)
        alts = [(chosen, token_lp(t))] + [(others[(start + d) % len(others)], token_lp(t) - 0.25 * (d + 1)) for d in range(k - 1)]
        return alts[: self.state["topk_cap"] or k][::-1]

    def score_top(self, pos: int, token: int, k: int) -> list[tuple[int, float]]:
        others = [p for p in self.pool if p != token]
        return [(others[(pos * 3 + d) % len(others)], -0.02 - 0.1 * d - 0.001 * pos) for d in range(k)]

    def render(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.tok.decode([token])

    # the API
    def _api(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": self.state["models"]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._answer(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._answer(await request.json(), chat=True)

        return app

    async def _answer(self, body: dict, chat: bool):
        s = self.state
        s["bodies"].append(body)
        s["inflight"] += 1
        s["max_inflight"] = max(s["max_inflight"], s["inflight"])
        try:
            await asyncio.sleep(s["delay"])
            if body.get("echo"):
                return self._echo(body)
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            k = (body.get("top_logprobs", 0) if body.get("logprobs") else 0) if chat else (body.get("logprobs") or 0)
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            choices, generated = [], 0
            for j in range(body.get("n", 1)):
                ids, text, finish = self.completion_ids(body["seed"], j, body["max_tokens"])
                generated += len(ids)
                choices.append(self._choice(j, ids, text, finish, k, as_ids, chat))
            usage = {"prompt_tokens": len(self.tok(prompt)["input_ids"]), "completion_tokens": generated}
            usage["total_tokens"] = usage["prompt_tokens"] + generated
            kind = "chat.completion" if chat else "text_completion"
            return {"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": choices[::-1], "usage": usage}
        finally:
            s["inflight"] -= 1

    def _choice(self, j: int, ids: list[int], text: str, finish: str, k: int, as_ids: bool, chat: bool) -> dict:
        names = [self.render(i, as_ids) for i in ids]
        tops = [[(self.render(a, as_ids), v) for a, v in self.alternatives(c, t, k)] for t, c in enumerate(ids)]
        if self.state["tamper"] == "unknown_token":
            names[0] = "\u2603"
        if self.state["tamper"] == "wrong_text":
            text += "!"
        show = k and not self.state["no_logprobs"]
        if chat:
            content = [{"token": name, "logprob": token_lp(t), "bytes": list(name.encode()),
                        "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in tops[t]]}
                       for t, name in enumerate(names)]  # fmt: skip
            return {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": {"content": content} if show else None}  # fmt: skip
        offsets = np.cumsum([0] + [len(self.tok.decode([i])) for i in ids[:-1]]).tolist()
        logprobs = {"tokens": names, "token_logprobs": [token_lp(t) for t in range(len(ids))],
                    "top_logprobs": [dict(top) for top in tops], "text_offset": offsets}  # fmt: skip
        return {"index": j, "text": text, "finish_reason": finish, "logprobs": logprobs if show else None}

    def _echo(self, body: dict) -> dict:
        """Scoring: the prompt ids echoed with their log-probs (+ the generated tokens)."""
        ids, k, as_ids = list(body["prompt"]), body.get("logprobs") or 0, bool(body.get("return_tokens_as_token_ids"))
        ids += [self.tok.eos_token_id] * body["max_tokens"]
        rows = [None] + [[*self.score_top(p, ids[p], k), (ids[p], score_lp(p, ids[p]))] for p in range(1, len(ids))]
        choice = {"index": 0, "text": self.tok.decode(ids), "finish_reason": "length"}
        if self.state["score_format"] == "prompt_logprobs":  # vLLM's extension
            choice["logprobs"] = None
            choice["prompt_logprobs"] = [None] + [
                {str(a): {"logprob": v, "rank": r + 1, "decoded_token": self.tok.decode([a])} for r, (a, v) in enumerate(row)}
                for row in rows[1:]
            ]
        else:
            choice["logprobs"] = {
                "tokens": [self.render(i, as_ids) for i in ids],
                "token_logprobs": [None] + [score_lp(p, ids[p]) for p in range(1, len(ids))],
                "top_logprobs": [None] + [{self.render(a, as_ids): v for a, v in row} for row in rows[1:]],
                "text_offset": list(range(len(ids))),
            }
        return {"id": "s", "object": "text_completion", "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}}  # fmt: skip

    # the fault switch, in front of the API
    def _faulty(self, app):
        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            self.active += 1
            try:
                return await faults(scope, receive, send)
            finally:
                self.active -= 1
                self.last_seen = time.monotonic()

        async def faults(scope, receive, send):
            s = self.state
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            s["auth"].append(auth)
            if s["key"] and auth != f"Bearer {s['key']}":
                return await reply(send, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            if scope["method"] != "POST":
                return await app(scope, receive, send)
            s["posts"] += 1
            fault = s["faults"].pop(0) if s["faults"] else s["always"]
            if fault == "500":
                return await reply(send, 500, {"error": {"message": f"boom {s['posts']}", "type": "server_error"}})
            if fault == "429":
                return await reply(send, 429, {"error": {"message": "slow down"}}, [(b"retry-after", b"1")])
            if fault == "400":
                return await reply(send, 400, {"error": {"message": f"bad request, key was {s.get('echo_key')}", "type": "invalid_request_error"}})
            if fault == "garbage":
                return await reply(send, 200, b"{not json")
            if fault == "missing":
                return await reply(send, 200, {"id": "x", "object": "text_completion"})
            if fault == "slow":
                await asyncio.sleep(0.8)
            if fault == "drop":  # promise 1000 bytes, send a few, hang up
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})  # fmt: skip
                await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
                return None
            return await app(scope, receive, send)

        return asgi


async def reply(send, status: int, body, headers=()) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def config(tokenizer="", **changes) -> TeacherConfig:
    return TeacherConfig(**{"tokenizer": str(tokenizer), "retries": 2, "backoff": 0.01, "timeout": 10.0, **changes})


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, vocab_size=320, out=out)
    return out


def running(tokenizer):
    """A ``FakeOpenAI`` of ``tokenizer`` served on loopback for as long as the generator lives."""
    fake = FakeOpenAI(tokenizer)
    with serving(fake.app) as base:
        fake.url = f"{base}/v1"
        yield fake


@pytest.fixture(scope="module")
def server(tok_dir):
    from stages.lm.models import load_tokenizer

    yield from running(load_tokenizer(tok_dir))


@pytest.fixture
def fake(server):
    server.reset()
    return server


def expected(fake: FakeOpenAI, seed: int, j: int, max_tokens: int = 16):
    return fake.completion_ids(seed, j, max_tokens)


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("token_ids", [True, False], ids=["token_id:N", "strings"])
def test_both_formats_parse_into_ordered_completions_with_ids_topk_and_usage(fake, tok_dir, api, token_ids):
    teacher = HTTPTeacher(fake.url, config(tok_dir, api=api, token_ids=token_ids))
    assert isinstance(teacher, Teacher) and teacher.same_tokenizer and teacher.why_text_only is None
    rows = teacher.generate(["Question: 1 + 2", "Question: 3 + 4", "Question: 5 + 6"], 2, Sampling(max_new_tokens=4, top_k=3, seed=5))
    assert len(rows) == 6 and len(fake.state["bodies"]) == 3
    for body in fake.state["bodies"]:
        assert body["seed"] == 5 + ["Question: 1 + 2", "Question: 3 + 4", "Question: 5 + 6"].index(
            body["messages"][0]["content"] if api == "chat" else body["prompt"]) and body["n"] == 2  # fmt: skip
        assert body.get("return_tokens_as_token_ids", False) is token_ids
        assert (body["logprobs"], body["top_logprobs"]) == (True, 3) if api == "chat" else body["logprobs"] == 3
    for r, c in enumerate(rows):
        i, j = divmod(r, 2)
        ids, text, finish = expected(fake, 5 + i, j, max_tokens=4)
        assert (c.text, c.token_ids, c.finish_reason, c.k) == (text, ids, finish, 3)
        assert c.completion_tokens == len(ids) and c.prompt_tokens == len(fake.tok(f"Question: {2 * i + 1} + {2 * i + 2}")["input_ids"])
        assert c.seq_logprob == pytest.approx(sum(token_lp(t) for t in range(len(ids))))
        top_ids, top_lps = np.array(c.topk_ids).reshape(len(ids), 3), c.topk_logprobs.reshape(len(ids), 3)
        assert c.topk_logprobs.dtype == np.float32 and (np.diff(top_lps.astype(np.float32), axis=1) <= 0).all()
        assert top_ids[:, 0].tolist() == ids  # the generated token is the fake model's best
        want = [[a for a, _ in sorted(fake.alternatives(t_id, t, 3), key=lambda p: -p[1])] for t, t_id in enumerate(ids)]
        assert top_ids.tolist() == want
    assert any(c.finish_reason == "stop" for c in rows) and any(c.finish_reason == "length" for c in rows)


def test_fewer_topk_than_asked_records_the_k_served(fake, tok_dir):
    fake.state["topk_cap"] = 2
    rows = HTTPTeacher(fake.url, config(tok_dir)).generate(["Question: 1 + 1"], 1, Sampling(top_k=5))
    c = rows[0]
    assert c.k == 2 and len(c.topk_ids) == len(c.token_ids) * 2 == c.topk_logprobs.size


def test_no_logprobs_when_asked_is_a_clear_error_and_top_k_0_is_text(fake, tok_dir):
    teacher = HTTPTeacher(fake.url, config(tok_dir))
    fake.state["no_logprobs"] = True
    with pytest.raises(DistilError, match="returned no logprobs; it cannot serve top-k teacher data: set top_k=0"):
        teacher.generate(["Question: 1 + 1"], 1, Sampling(top_k=2))
    assert fake.state["posts"] == 1  # a capability, not a fault: not retried
    rows = teacher.generate(["Question: 1 + 1"], 2, Sampling(top_k=0, seed=1))
    assert "logprobs" not in fake.state["bodies"][-1] and "return_tokens_as_token_ids" not in fake.state["bodies"][-1]
    assert [c.text for c in rows] == [expected(fake, 1, 0)[1], expected(fake, 1, 1)[1]]
    assert all(c.token_ids is None and c.seq_logprob is None and c.k == 0 for c in rows)
    total = len(expected(fake, 1, 0)[0]) + len(expected(fake, 1, 1)[0])
    assert [c.completion_tokens for c in rows] == [round(total / 2)] * 2


@pytest.mark.parametrize("tamper", ["unknown_token", "wrong_text"])
def test_tokens_that_do_not_map_or_decode_to_the_text_give_no_ids(fake, tok_dir, tamper):
    fake.state["tamper"] = tamper
    teacher = HTTPTeacher(fake.url, config(tok_dir, token_ids=False))
    rows = teacher.generate(["Question: 2 + 2"], 2, Sampling(top_k=2))
    assert all(c.token_ids is None and c.k == 0 and c.topk_ids == [] for c in rows)
    assert all(c.seq_logprob is not None and c.text for c in rows)  # the text and its log-prob survive
    assert teacher.rows_without_ids == 2
    assert ("no single id" if tamper == "unknown_token" else "decodes the server's tokens to another text") in teacher.why_no_ids


def test_a_served_fingerprint_decides_whether_ids_are_trusted(fake, tok_dir):
    same = tokenizer_fingerprint(fake.tok)
    fake.state["models"][0]["tokenizer"] = same
    teacher = HTTPTeacher(fake.url, config(tok_dir))
    assert teacher.same_tokenizer and teacher.identity["tokenizer"] == same
    other = tokenizer_fingerprint(train_tokenizer(CORPUS[:40], vocab_size=300))
    fake.state["models"][0]["tokenizer"] = other
    teacher = HTTPTeacher(fake.url, config(tok_dir))
    assert not teacher.same_tokenizer and teacher.tokenizer is not None and "differs from teacher.tokenizer" in teacher.why_text_only
    assert teacher.identity["tokenizer"] is None
    rows = teacher.generate(["Question: 1 + 1"], 1, Sampling(top_k=2))
    assert rows[0].token_ids is None and rows[0].text and "return_tokens_as_token_ids" not in fake.state["bodies"][-1]
    with pytest.raises(DistilError, match="needs the server's token ids, but the server's tokenizer"):
        teacher.score([[1, 2]], [[3]], 2)


def test_without_a_tokenizer_the_teacher_is_text_only_and_identified_by_url_and_model(fake):
    teacher = open_teacher(fake.url + "/", config(), "cpu")
    assert isinstance(teacher, HTTPTeacher) and teacher.tokenizer is None and not teacher.same_tokenizer and "teacher.tokenizer is not set" in teacher.why_text_only
    assert teacher.context == 128 and teacher.model == "tiny"
    ident = teacher.identity
    assert ident["backend"] == "http" and ident["url"] == fake.url and ident["model"] == "tiny" and ident["tokenizer"] is None
    assert ident["sha256"] == HTTPTeacher(fake.url, config()).identity["sha256"] and len(ident["sha256"]) == 64
    fake.state["models"] = [{"id": "tiny", "object": "model"}, {"id": "other", "object": "model", "context_length": 64}]
    assert HTTPTeacher(fake.url, config(model="other")).identity["sha256"] != ident["sha256"]
    assert HTTPTeacher(fake.url, config(model="other")).context == 64
    assert HTTPTeacher(fake.url, config(model="tiny")).context is None
    rows = teacher.generate(["Question: 1 + 1", "Question: 2 + 2"], 1, Sampling(top_k=3))
    assert [c.token_ids for c in rows] == [None, None] and [c.text for c in rows] == [expected(fake, 0, 0)[1], expected(fake, 1, 0)[1]]
    assert teacher.generate([], 3, Sampling()) == []
    teacher.close()
    with pytest.raises(RuntimeError, match="closed"):
        teacher.generate(["x"], 1, Sampling())


def test_model_choice_and_url_form_are_checked(fake):
    fake.state["models"] = [{"id": "big", "object": "model"}, {"id": "small", "object": "model"}]
    with pytest.raises(DistilError, match="serves several models \\(big, small\\); set teacher.model"):
        HTTPTeacher(fake.url, config())
    with pytest.raises(DistilError, match="has no model 'tiny': it serves big, small; set teacher.model"):
        HTTPTeacher(fake.url, config(model="tiny"))
    assert HTTPTeacher(fake.url, config(model="small")).model == "small"
    base = fake.url.removesuffix("/v1")
    with pytest.raises(DistilError, match=f"ending in /v1: use {base}/v1"):
        HTTPTeacher(base, config())
    with pytest.raises(DistilError, match=f"ending in /v1: use {base}/v1"):
        HTTPTeacher(f"{base}/v1/completions", config())
    with pytest.raises(DistilError, match="credentials"):
        HTTPTeacher(fake.url.replace("http://", "http://me:secret@"), config())
    fake.state["models"] = []
    with pytest.raises(DistilError, match="serves no model"):
        HTTPTeacher(fake.url, config())


@pytest.mark.parametrize("token_ids", [True, False], ids=["token_id:N", "strings"])
@pytest.mark.parametrize("form", ["echo", "prompt_logprobs"])
def test_score_reads_the_completion_positions_of_an_echo(fake, tok_dir, form, token_ids):
    fake.state["score_format"] = form
    teacher = HTTPTeacher(fake.url, config(tok_dir, token_ids=token_ids))
    prompts = [fake.tok("Question: 1 + 2")["input_ids"], fake.tok("Question: 10")["input_ids"]]
    completions = [fake.tok(" Answer: 3")["input_ids"], fake.tok(" 7")["input_ids"]]
    scored = teacher.score(prompts, completions, 3)
    assert sorted(b["prompt"] for b in fake.state["bodies"]) == sorted([prompts[0] + completions[0], prompts[1] + completions[1]])
    body = fake.state["bodies"][0]
    assert body["echo"] is True and body["temperature"] == 0 and body["logprobs"] == 3
    assert body.get("return_tokens_as_token_ids", False) is token_ids
    for p, c, s in zip(prompts, completions, scored, strict=True):
        positions = range(len(p), len(p) + len(c))
        assert s.logprobs.shape == (len(c),) and s.topk_ids.shape == s.topk_logprobs.shape == (len(c), 3)
        assert s.logprobs.tolist() == pytest.approx([score_lp(pos, t) for pos, t in zip(positions, c, strict=True)])
        assert s.topk_ids.tolist() == [[a for a, _ in fake.score_top(pos, t, 3)] for pos, t in zip(positions, c, strict=True)]
        want = [[v for _, v in fake.score_top(pos, t, 3)] for pos, t in zip(positions, c, strict=True)]
        np.testing.assert_allclose(s.topk_logprobs, want, rtol=1e-6)
    zero = teacher.score(prompts[:1], completions[:1], 0)[0]
    assert zero.topk_ids.shape == (len(completions[0]), 0) and zero.logprobs.shape == (len(completions[0]),)
    assert teacher.score([], [], 3) == []
    with pytest.raises(DistilError, match="at least one prompt token"):
        teacher.score([[]], [[5]], 2)


def test_score_refuses_an_echo_of_other_tokens(fake, tok_dir, monkeypatch):
    teacher = HTTPTeacher(fake.url, config(tok_dir))
    real = fake._echo

    def shifted(body):
        out = real(body)
        out["choices"][0]["logprobs"]["tokens"][-2] = f"token_id:{(body['prompt'][-1] + 1) % len(fake.tok)}"
        return out

    monkeypatch.setattr(fake, "_echo", shifted)
    with pytest.raises(DistilError, match="tokenizer differs from teacher.tokenizer, and scoring needs the same tokenizer"):
        teacher.score([[5, 6]], [[7, 8]], 2)
