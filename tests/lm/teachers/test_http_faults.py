"""The HTTP teacher against a misbehaving server: retries on 5xx, 429 (Retry-After),
malformed bodies, timeouts and dropped connections; bounded concurrency; the API key sent
but never shown; early, clear errors for a missing key, a 4xx and an unreachable URL.
"""

from __future__ import annotations

import time

import pytest
from loopback import free_port
from test_http_teacher import config, expected, running

from stages.errors import DistilError
from stages.lm.teachers.base import Sampling
from stages.lm.teachers.http import HTTPTeacher
from stages.lm.teachers.http_client import RETRY_AFTER_CAP, Transport

KEY = "sk-test-5f0c2a9e-do-not-print"
PROMPTS = ["Question: 1 + 1"]


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from stages.lm.models import train_tokenizer

    yield from running(train_tokenizer([f"Question: {a} + {a}\nAnswer: {2 * a}" for a in range(50)], vocab_size=300))


@pytest.fixture
def fake(server):
    server.reset()
    return server


def one_text(teacher: HTTPTeacher) -> str:
    return teacher.generate(PROMPTS, 1, Sampling())[0].text


def test_5xx_twice_then_ok_is_retried(fake):
    teacher = HTTPTeacher(fake.url, config(retries=3))
    fake.state["faults"] = ["500", "500"]
    assert one_text(teacher) == expected(fake, 0, 0)[1]
    assert fake.state["posts"] == 3


def test_429_waits_for_retry_after(fake):
    teacher = HTTPTeacher(fake.url, config(retries=2, backoff=0.001))
    fake.state["faults"] = ["429"]
    start = time.monotonic()
    assert one_text(teacher) == expected(fake, 0, 0)[1]
    assert time.monotonic() - start >= 0.95 and fake.state["posts"] == 2


@pytest.mark.parametrize(
    ("fault", "error"),
    [("garbage", r"malformed response to /completions \(JSONDecodeError"), ("missing", r"malformed response .*KeyError: 'choices'"),
     ("drop", r"connection failed \((RemoteProtocolError|ReadError)")],  # which one depends on when the drop lands
)  # fmt: skip
def test_malformed_or_dropped_answers_are_retried(fake, fault, error):
    teacher = HTTPTeacher(fake.url, config(retries=2))
    fake.state["faults"] = [fault]
    assert one_text(teacher) == expected(fake, 0, 0)[1]
    assert fake.state["posts"] == 2
    fake.state["always"] = fault
    with pytest.raises(DistilError, match=error + ".* after 2 retries"):
        one_text(teacher)
    assert fake.state["posts"] == 5


def test_a_slow_server_times_out_and_is_retried(fake):
    teacher = HTTPTeacher(fake.url, config(retries=1, timeout=0.3))
    fake.state["faults"] = ["slow"]
    assert one_text(teacher) == expected(fake, 0, 0)[1] and fake.state["posts"] == 2
    fake.reset()
    fake.state["always"] = "slow"
    start = time.monotonic()
    with pytest.raises(DistilError, match=r"no answer within 0\.3 s \(teacher\.timeout\) after 1 retries"):
        one_text(teacher)
    assert fake.state["posts"] == 2 and time.monotonic() - start < 2.0


def test_a_permanent_500_fails_after_exactly_retries_plus_one_attempts(fake):
    teacher = HTTPTeacher(fake.url, config(retries=2))
    fake.state["always"] = "500"
    with pytest.raises(DistilError, match=rf"teacher server {fake.url}: HTTP 500: boom 3 after 2 retries; "):
        one_text(teacher)
    assert fake.state["posts"] == 3


def test_generate_returns_all_or_raises(fake):
    teacher = HTTPTeacher(fake.url, config(retries=0, concurrency=2))
    fake.state["faults"] = [None, None, "500"]
    with pytest.raises(DistilError, match="HTTP 500"):
        teacher.generate([f"Question: {i}" for i in range(6)], 1, Sampling())


def test_other_4xx_is_not_retried_and_quotes_the_server(fake):
    teacher = HTTPTeacher(fake.url, config(retries=3))
    fake.state["faults"] = ["400"]
    with pytest.raises(DistilError, match="refused POST /completions: HTTP 400: bad request"):
        one_text(teacher)
    assert fake.state["posts"] == 1


def test_concurrency_bounds_the_requests_in_flight(fake):
    teacher = HTTPTeacher(fake.url, config(concurrency=4))
    fake.state["delay"] = 0.15
    rows = teacher.generate([f"Question: {i}" for i in range(12)], 1, Sampling())
    assert len(rows) == 12 and fake.state["posts"] == 12
    assert fake.state["max_inflight"] == 4


def test_the_api_key_is_sent_but_never_shown(fake, monkeypatch):
    monkeypatch.setenv("DISTIL_TEST_KEY", KEY)
    fake.state["key"] = KEY
    fake.state["echo_key"] = KEY  # a careless server quoting the key in its error
    teacher = HTTPTeacher(fake.url, config(api_key_env="DISTIL_TEST_KEY", retries=1))
    assert one_text(teacher) == expected(fake, 0, 0)[1]
    assert set(fake.state["auth"]) == {f"Bearer {KEY}"}
    messages = []
    for fault in ("400", "500"):
        fake.state["faults"] = [fault, fault]
        with pytest.raises(DistilError) as err:
            one_text(teacher)
        messages.append(str(err.value))
    assert "bad request, key was ***" in messages[0]
    shown = [repr(teacher), str(teacher.identity), repr(teacher._transport), *messages]
    assert not any(KEY in text for text in shown)


def test_a_server_needing_a_key_fails_before_any_work(fake, monkeypatch):
    fake.state["key"] = KEY
    with pytest.raises(DistilError, match=r"needs an API key: set \$OPENAI_API_KEY \(teacher.api_key_env names the variable\)"):
        HTTPTeacher(fake.url, config())
    assert fake.state["posts"] == 0 and len(fake.state["auth"]) == 1  # one probe, no retries
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with pytest.raises(DistilError, match=r"refused the API key in \$OPENAI_API_KEY") as err:
        HTTPTeacher(fake.url, config())
    assert "sk-wrong" not in str(err.value)


def test_an_unreachable_url_fails_quickly_naming_it():
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(DistilError, match=rf"teacher server {url}: connection failed \(ConnectError.*after 1 retries"):
        HTTPTeacher(url, config(retries=1, backoff=0.01))
    assert time.monotonic() - start < 5


def test_backoff_doubles_with_jitter_and_honours_a_capped_retry_after():
    low = Transport("u", None, "K", 1.0, 3, 0.5, jitter=lambda: 0.0)
    high = Transport("u", None, "K", 1.0, 3, 0.5, jitter=lambda: 0.999)
    assert [low.delay(a, None) for a in range(3)] == [0.5, 1.0, 2.0]
    assert all(low.delay(a, None) < high.delay(a, None) < 1.5 * low.delay(a, None) for a in range(3))
    assert low.delay(0, 3.0) == 3.0 and low.delay(3, 1.0) == 4.0
    assert low.delay(0, 10_000.0) == RETRY_AFTER_CAP
