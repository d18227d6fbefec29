"""Shared fixtures: tiny params, a CLI runner, and a tiny trained teacher + teacher data.

Everything runs on CPU, offline, inside tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVCLIVE_OPEN", "false")

from distilcli.app import app  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    parser.addoption("--fault-points", type=int, default=None,
                     help="kill points per stage of tests/contract/test_faults.py (default: $DISTIL_FAULT_POINTS or 1)")  # fmt: skip


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


def resumes_like_uninterrupted(run, tmp_path: Path, weights: str = "denoiser/diffusion_pytorch_model.safetensors") -> None:
    """``run(out)`` trains a generator; killed at its second checkpoint and rerun, it ends with the
    weights of an uninterrupted run (a method's extra state, fake scores and phases included)."""
    import stages.diffusion.training as training
    from stages.artifacts import load_tensors

    run(tmp_path / "ref")
    with dies_on_call(training, "save_state", 2, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "again")
    run(tmp_path / "again")
    a, b = load_tensors(tmp_path / "again" / weights), load_tensors(tmp_path / "ref" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digits_cli(root: Path, width: int = 64) -> Cli:
    """A CLI on 300 digits rows per split (the tiny params otherwise) whose ``distill`` student is a
    ``width``-unit MLP: enough rows for a method's effect to show, few enough for a test."""
    return Cli(write_params(root, data={"limit": 300}, distill={"model": {"arch": "mlp", "width": width, "depth": 1}}))


MOONS_DATA_SIZES = [256, 32, 32]
"""The moons splits of the diffusion students' tests (the shared moons teacher's data)."""
MOONS_NET = {"width": 32, "depth": 1, "checkpoint_every": 1}
"""The tiny MLP denoiser of the moons teacher the diffusion students' tests share."""


@pytest.fixture(scope="session")
def moons_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusion teacher on 256 moons points (200 steps of ``denoise``), built once per session."""
    from stages import distill
    from stages.config import DataConfig, DiffusionConfig, DistillConfig

    root = tmp_path_factory.mktemp("moons-teacher")
    cfg = DistillConfig(method="denoise", diffusion=DiffusionConfig(**MOONS_NET), steps=200, batch_size=64, lr=0.003)
    distill.run(cfg, "moons", root / "t", data_cfg=DataConfig(sizes=MOONS_DATA_SIZES), progress=False)
    return root / "t"


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


@pytest.fixture(scope="session")
def dvc_pipeline(tmp_path_factory):
    """The repo's pipeline (its dvc.yaml, .gitignore, code) in a fresh git repo, with tiny params,
    reproduced as ``make demo`` does (``pipelines/repro.py``, two stages at once): ``(repo, run)``.
    Shared by the DVC modules; test_dvc_experiments commits it as its baseline and runs
    experiments on it, so it runs after test_dvc."""
    repo = tmp_path_factory.mktemp("pipeline")
    for item in ("dvc.yaml", ".dvcignore", ".gitignore", "stages", "distilcli", "pipelines/repro.py"):
        src = REPO_ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / item).parent.mkdir(exist_ok=True)
            shutil.copy(src, repo / item)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["limit"] = 60
    params["teacher"]["epochs"] = 2
    params["distill"]["epochs"] = 2
    params["data"]["sizes"] = [40, 8, 8]
    params["data"]["unlabeled"] = 16
    params["lm_teacher"]["epochs"] = 1
    params["lm_student"]["steps"] = 2
    params["lm_on_policy"]["steps"] = 2
    params["lm_cascade"].update(samples=2, max_new_tokens=4)
    params["lm_teacher"]["lm"].update(hidden=32, layers=1, heads=2, vocab_size=320)
    params["lm_student"]["lm"].update(hidden=16, layers=1, heads=2, vocab_size=320, max_new_tokens=3)
    params["lm_generate"].update(samples=2, max_new_tokens=4)
    params["lm_evaluate"]["max_new_tokens"] = 4
    for section in ("diffusion_teacher", "diffusion_student"):
        params[section].update(steps=3, batch_size=16)
        params[section]["diffusion"].update(width=16, depth=1)
    params["diffusion_student"]["diffusion"].update(eval_samples=8, eval_steps=2)
    params["diffusion_evaluate"].update(step_counts=[1, 2], n_samples=16, teacher_steps=2, time_samples=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run = repo_shell(repo, timeout=600)

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    run(sys.executable, "pipelines/repro.py", "--jobs", "2")  # as `make demo` runs it: two stages at once
    return repo, run
