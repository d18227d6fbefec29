"""The official ``openai`` Python client against `distil serve` on 127.0.0.1: models,
completions with log-probs, teacher scoring (echo, max_tokens 0), chat, chat log-probs,
streamed chat, and errors raised as the client's own exception classes."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from loopback import serving
from serve_helpers import engine, open_engine, serve_config, tiny_lm  # noqa: F401  (engine: a fixture)

from stages.lm.serve import build_app
from stages.lm.teachers.base import Sampling
from stages.lm.teachers.vocabulary import tokenizer_fingerprint

NAME = "tiny-student"
PROMPT = "Question: 3 + 4\nAnswer:"


@pytest.fixture(scope="module")
def client(engine):
    with serving(build_app(engine, serve_config(max_tokens=24, max_logprobs=5), NAME)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def _greedy(engine, prompt: str, max_tokens: int):
    return engine.generate([prompt], 1, Sampling(temperature=0, max_new_tokens=max_tokens, top_k=1))[0]


def test_models_list_names_the_model_and_its_tokenizer(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["tokenizer"] == tokenizer_fingerprint(engine.tokenizer)


def test_completion_logprobs_format(client, engine):
    k = 3
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=k)
    choice = out.choices[0]
    assert choice.text == _greedy(engine, PROMPT, 8).text
    lp = choice.logprobs
    n = len(lp.tokens)
    assert n == out.usage.completion_tokens and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= k  # distinct ids may decode to one string (a byte of a character)
        assert chosen <= 0 and all(v <= 0 for v in top.values())
        assert max(top.values()) >= chosen and token in top  # greedy: the chosen token is the top-1
    by_id = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=k,
                                      extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs  # fmt: skip
    assert all(len(top) == k for top in by_id.top_logprobs)
    assert [int(t.removeprefix("token_id:")) for t in by_id.tokens] == _greedy(engine, PROMPT, 8).token_ids


def test_echo_scoring_equals_engine_score(client, engine):
    ids = engine.tokenizer(PROMPT + " 7", add_special_tokens=False)["input_ids"]
    out = client.completions.create(model=NAME, prompt=ids, echo=True, max_tokens=0, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    lp = out.choices[0].logprobs
    assert out.choices[0].text == engine.tokenizer.decode(ids) and out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 0
    assert [int(t.removeprefix("token_id:")) for t in lp.tokens] == ids
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    direct = engine.score([ids[:1]], [ids[1:]], 2)[0]
    np.testing.assert_allclose(lp.token_logprobs[1:], direct.logprobs, rtol=1e-5)
    for top, want_ids, want_lp in zip(lp.top_logprobs[1:], direct.topk_ids, direct.topk_logprobs, strict=True):
        assert [int(t.removeprefix("token_id:")) for t in top] == list(want_ids)
        np.testing.assert_allclose(list(top.values()), want_lp, rtol=1e-5)


def test_chat_completion_is_the_greedy_answer_to_the_user_content(client, engine):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _greedy(engine, PROMPT, 6).text
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_logprobs_and_top_logprobs(client):
    messages = [{"role": "user", "content": PROMPT}]
    ids = {"return_tokens_as_token_ids": True}
    out = client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=4, extra_body=ids
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        assert entry.token.startswith("token_id:") and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].token == entry.token
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob == values[0] <= 0


def test_streamed_chat_adds_up_to_the_greedy_answer(client):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_errors_are_the_clients_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 24"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=25)
    with pytest.raises(openai.BadRequestError, match="logprobs 6 is above"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, logprobs=6)
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
