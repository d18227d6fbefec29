"""Shared fixtures: tiny params, a CLI runner, and a tiny trained teacher + teacher data.

Everything runs on CPU, offline, inside tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVCLIVE_OPEN", "false")

from distilcli.app import app  # noqa: E402

TINY = {
    "data": {"split_seed": 0, "dev_frac": 0.2, "test_frac": 0.2, "limit": 60},
    "teacher": {"method": "ce", "model": {"arch": "mlp", "width": 32, "depth": 1}, "epochs": 3, "batch_size": 32, "lr": 0.01},
    "distill": {"method": "kd", "model": {"arch": "mlp", "width": 8, "depth": 1}, "epochs": 2, "batch_size": 32},
    "generate_teacher_data": {"shard_rows": 25},
    "select": {"by": "confident", "require_correct": False, "threshold": 0.0},
    "cascade": {"policy": "confidence"},
    "evaluate": {"bins": 10},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from the current code")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


def write_params(directory: Path, **changes: dict) -> Path:
    params = {k: dict(v) for k, v in TINY.items()}
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


class Cli:
    """Runs `distil ...` in-process; ``ok`` asserts success, ``fails`` asserts a clean exit 2."""

    def __init__(self, params: Path):
        self.runner = CliRunner()
        self.params = params

    def __call__(self, *args: str):
        argv = [str(a) for a in args]
        if argv and argv[0] not in ("--help", "--version") and "--help" not in argv and "--params" not in argv:
            argv += ["--params", str(self.params)]
        return self.runner.invoke(app, argv)

    def ok(self, *args: str):
        result = self(*args)
        assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        return result

    def fails(self, *args: str, match: str):
        result = self(*args)
        assert result.exit_code == 2, f"expected exit 2, got {result.exit_code}\n{result.output}\n{result.exception!r}"
        out = result.output.strip()
        assert "Traceback" not in out, out
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines and match.lower() in out.lower().replace("\n", " "), out
        assert len(lines) <= 2, f"expected one error line:\n{out}"
        return result


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(write_params(tmp_path))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny teacher, its teacher data and a selection, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    c = Cli(write_params(root))
    paths = {"root": root, "teacher": root / "teacher", "tdata": root / "tdata", "selected": root / "selected"}
    c.ok("distill", "--section", "teacher", "--data", "digits", "--out", paths["teacher"], "-q")
    c.ok("generate-teacher-data", "--teacher", paths["teacher"], "--data", "digits", "--out", paths["tdata"], "-q")
    c.ok("select", paths["tdata"], "--out", paths["selected"], "-q")
    return paths


@contextlib.contextmanager
def dies_on_call(owner, name: str, n: int, exc: type[BaseException] = KeyboardInterrupt, *, after: bool = True):
    """Within the block, the n-th call of ``owner.name`` raises ``exc`` (after doing its work,
    or instead of it with ``after=False``): a stage killed at a chosen point."""
    real, calls = getattr(owner, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n and not after:
            raise exc
        out = real(*args, **kwargs)
        if calls["n"] == n and after:
            raise exc
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, dying)
        yield


def repo_shell(repo: Path, timeout: int = 600):
    """``run(*argv) -> stdout`` in ``repo`` with this venv first on PATH, a git identity and
    DVC analytics off; a non-zero exit fails the test with the tail of both streams."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "distil-tests", "GIT_AUTHOR_EMAIL": "tests@distil.invalid",
        "GIT_COMMITTER_NAME": "distil-tests", "GIT_COMMITTER_EMAIL": "tests@distil.invalid",
        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip

    def run(*args: str) -> str:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    return run
