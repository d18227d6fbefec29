"""`distil serve` as a command: a real subprocess that announces itself, answers, and on
SIGTERM finishes the request in flight and exits 0; bad input is one line and exit 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from loopback import free_port
from serve_helpers import classifier_dir, tiny_lm


def _wait(check, what: str, proc: subprocess.Popen, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"distil serve ended (exit {proc.returncode}) before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _health(base: str) -> dict | None:
    try:
        return httpx.get(f"{base}/health", timeout=2).json()
    except httpx.TransportError:
        return None


def test_sigterm_drains_the_request_in_flight_and_exits_0(tmp_path, tmp_path_factory):
    model, port = tiny_lm(tmp_path_factory), free_port()
    base = f"http://127.0.0.1:{port}"
    # a long batch wait keeps the request in flight while the signal arrives
    argv = [
        sys.executable,
        "-m",
        "distilcli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--set",
        "batch_wait_ms=1500",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answer: dict = {}
    try:
        _wait(lambda: _health(base) is not None, "/health answers", proc)
        body = {"prompt": "Question: 1 + 2\nAnswer:", "max_tokens": 4, "temperature": 0}
        asking = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{base}/v1/completions", json=body, timeout=30)))
        asking.start()
        _wait(lambda: (_health(base) or {}).get("requests") == 1, "the request reaches the batcher", proc)
        proc.send_signal(signal.SIGTERM)
        asking.join(30)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert answer["r"].status_code == 200 and answer["r"].json()["usage"]["completion_tokens"] >= 1
    assert proc.returncode == 0, err[-2000:]
    assert out.splitlines() == [f"serving {model.name} on http://127.0.0.1:{port}/v1"]
    assert "interrupted" not in err


def test_a_classifier_a_generator_or_a_missing_dir_is_one_line(cli, tmp_path):
    cli.fails("serve", classifier_dir(tmp_path), match="`distil serve` does not support classifier inputs")
    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / "model_index.json").write_text("{}")
    cli.fails("serve", generator, match="does not support diffusion inputs")
    cli.fails("serve", tmp_path / "missing", match="does not exist")
    (tmp_path / "empty").mkdir()
    cli.fails("serve", tmp_path / "empty", match="holds no model")


def test_a_port_in_use_or_bad_settings_are_one_line(cli, tmp_path_factory):
    model = tiny_lm(tmp_path_factory)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli.fails("serve", model, "--port", str(port), match=f"cannot listen on 127.0.0.1:{port}")
    cli.fails("serve", model, "--port", "70000", match="port")
    cli.fails("serve", model, "--set", "max_batch=0", match="max_batch")
    cli.fails("serve", model, "--set", "workers=4", match="unknown key")


def test_help_names_the_endpoints_the_shared_options_and_an_example(cli):
    out = cli.ok("serve", "--help").output
    for text in ("/v1/completions", "/v1/chat/completions", "--host", "--port", "--params", "--set", "--seed", "--device"):
        assert text in out, text
    assert "Example" in out and "distil serve" in out
