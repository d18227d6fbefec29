"""`distil serve` for language models: open the engine, bind the port, run uvicorn until a
stop signal, then drain.

The port is bound before the model loads, so a port in use is one line at once. SIGTERM and
Ctrl-C are uvicorn's: it stops accepting, lets the requests in flight finish (streams
included) and returns; an end by signal is a normal end here (exit 0), not an interrupted
run to resume.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from stages.config import ServeConfig, TeacherConfig
from stages.errors import DistilError


def run(cfg: ServeConfig, model: Path, *, device: str = "auto", engine=None, name: str | None = None,
        announce: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:  # fmt: skip
    """Serve ``model`` (an LM directory or name) until SIGTERM / SIGINT; ``engine``, when given
    (a cascade), is served instead of opening ``model``, and closed at the end like it. The
    served name is ``cfg.model_name``, else ``name``, else the directory's name. Prints
    "serving NAME on http://HOST:PORT/v1" once the model is loaded."""
    import uvicorn

    from stages.lm.serve.app import build_app

    name = cfg.model_name or name or (Path(model).name if Path(model).is_dir() else str(model))
    sock = _bind(cfg.host, cfg.port)
    try:
        if engine is None:
            from stages.devices import resolve_device
            from stages.lm.teachers import open_teacher

            engine = open_teacher(model, TeacherConfig(), resolve_device(device))
        try:
            config = uvicorn.Config(build_app(engine, cfg, name), log_level="info", log_config=_logs(), lifespan="on")
            server = uvicorn.Server(config)
            host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
            announce(f"serving {name} on http://{host}:{cfg.port}/v1")
            with _signals_end_the_server():
                server.run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()


def _logs() -> dict:
    """uvicorn's logging with its access log on stderr too: stdout holds the one "serving" line."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # IPPROTO_TCP: asyncio sets TCP_NODELAY only then (no 40 ms delayed ACKs)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DistilError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port, or stop what uses it"
        ) from None
    return sock


class _signals_end_the_server:
    """uvicorn handles SIGINT / SIGTERM while it runs and, once drained, raises the signal
    again under the handler it found; the CLI's handler there would call the end an
    interrupted run (exit 143). Inside this block that handler does nothing, so a drained
    server returns and the command exits 0; the previous handlers come back after."""

    def __enter__(self) -> None:
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
