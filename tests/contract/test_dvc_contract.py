"""dvc.yaml's code deps follow the package layout: each stage depends on its router, its
own modality package and the shared ground, never on another modality's package, so an
edit under ``stages/lm`` reruns the LM stages only; ``make clean`` removes every output;
and, in a copy of the repo with placeholder outputs, ``dvc status`` shows exactly that."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import repo_shell

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "dvc.yaml").exists())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC["stages"]
MODALITIES = ("classifier", "lm", "diffusion")
COMMAND_MODULE = {"distill": "distill", "select": "select", "evaluate": "evaluate", "cascade": "cascade",
                  "generate-teacher-data": "teacher_data"}  # fmt: skip
"""The module of a modality package each router imports for its command."""
NEUTRAL = {"stages/__init__.py", "stages/errors.py", "stages/progress.py", "stages/devices.py"}
"""Shared modules that do not change what a stage writes (version string, messages,
progress bars, device choice): a stage need not depend on them."""


def _modality(stage: str) -> str:
    return "lm" if stage.startswith("lm_") else "diffusion" if stage.startswith("diffusion_") else "classifier"


def _command(stage: str) -> str:
    argv = shlex.split(STAGES[stage]["cmd"])
    assert argv[0] == "distil", STAGES[stage]["cmd"]
    return argv[1]


def _code_deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage].get("deps", []) if d.startswith("stages/")]


def _outputs(stage: str) -> list[str]:
    out = []
    for key in ("outs", "metrics", "plots"):
        for entry in STAGES[stage].get(key) or []:
            out.extend(entry if isinstance(entry, dict) else [entry])
    return out


ALL_OUTPUTS = sorted({o for s in STAGES for o in _outputs(s)})


# ---- (a) static: code deps per stage -----------------------------------------------------


def test_stage_names_say_their_modality():
    for stage in STAGES:
        assert _command(stage) in COMMAND_MODULE, stage
    assert {_modality(s) for s in STAGES} == set(MODALITIES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_its_router_and_its_own_modality_package_only(stage):
    deps = _code_deps(stage)
    router = f"stages/{_command(stage).replace('-', '_')}.py"
    assert router in deps, f"{stage}: cmd runs `distil {_command(stage)}` but does not depend on {router}"
    others = {f"stages/{c.replace('-', '_')}.py" for c in COMMAND_MODULE} - {router}
    assert not others & set(deps), f"{stage}: depends on another command's router {others & set(deps)}"
    own = f"stages/{_modality(stage)}"
    assert own in deps, f"{stage}: does not depend on its modality package {own}"
    for other in set(MODALITIES) - {_modality(stage)}:
        pkg = f"stages/{other}"
        bad = [d for d in deps if d == pkg or d.startswith(pkg + "/")]
        assert not bad, f"{stage}: depends on another modality's package {bad}"
    for shared in ("stages/artifacts", "stages/config.py", "stages/modality.py", "stages/tasks"):
        assert shared in deps, f"{stage}: does not depend on the shared {shared}"
    for dep in deps:
        assert (ROOT / dep).exists(), f"{stage}: dep {dep} does not exist"
    assert len(deps) == len(set(deps)), f"{stage}: a dep is listed twice"


# The code a stage runs, found statically: its router, the module of its modality package
# that the router imports for the command, and everything they import from stages/.
# (stages/modality.py's `of_method` only looks method names up in the three packages' tables,
# so its imports of the modality packages are not followed.)


def _file(module: str) -> Path | None:
    p = ROOT.joinpath(*module.split("."))
    if (p / "__init__.py").exists():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").exists() else None


@functools.cache
def _imports(module: str) -> frozenset[str]:
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "stages":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "stages")
    return frozenset(m for m in found if _file(m))


def _closure(starts: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            module = ".".join(parts[:i])
            if module in seen:
                continue
            seen.add(module)
            for name in _imports(module):
                if module == "stages.modality" and name.split(".")[1] in MODALITIES:
                    continue
                todo.append(name)
    return seen


def _group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "stages/__init__.py"
    return f"stages/{parts[1]}" if (ROOT / "stages" / parts[1]).is_dir() else f"stages/{parts[1]}.py"


def _code_used(stage: str) -> set[str]:
    command = _command(stage)
    starts = [f"stages.{command.replace('-', '_')}", f"stages.{_modality(stage)}.{COMMAND_MODULE[command]}"]
    return {_group(m) for m in _closure(starts)}


def test_the_import_scan_sees_what_it_should():
    used = _code_used("select")
    assert {"stages/select.py", "stages/classifier", "stages/modality.py", "stages/config.py"} <= used
    assert "stages/lm" not in used and "stages/diffusion" not in used
    assert "stages/diffusion" in _code_used("diffusion_teacher") and "stages/classifier" not in _code_used("lm_kd")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_are_all_used(stage):
    unused = sorted(set(_code_deps(stage)) - _code_used(stage))
    assert not unused, f"{stage}: depends on {unused}, which its code never imports"


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_modality_package_imports_no_other_modality_package(modality):
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "stages" / modality).rglob("*.py")]
    for module in modules:
        module = module.removesuffix(".__init__")
        for name in _imports(module) - {"stages"}:  # `from stages import x` also lists stages.x
            other = name.split(".")[1]
            assert other == modality or other not in MODALITIES, f"{module} imports {name}"


# Every shared helper a stage's code imports is a dep, so editing it reruns the stage.
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_shared_module_its_code_imports(stage):
    missing = sorted(_code_used(stage) - set(_code_deps(stage)) - NEUTRAL)
    assert not missing, f"{stage}: its code imports {missing} but dvc.yaml does not list them as deps"


def test_params_sections_named_with_section_hold_only_their_modalitys_settings():
    """A stage's --section is checked by check_modality: `dvc repro` would fail on a foreign key."""
    from stages.config import (
        CascadeConfig,
        DistillConfig,
        EvaluateConfig,
        GenerateTeacherDataConfig,
        SelectConfig,
        check_modality,
        load_section,
        parse_overrides,
    )

    classes = {"distill": DistillConfig, "select": SelectConfig, "evaluate": EvaluateConfig, "cascade": CascadeConfig,
               "generate-teacher-data": GenerateTeacherDataConfig}  # fmt: skip
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    checked = 0
    for stage in STAGES:
        argv = shlex.split(STAGES[stage]["cmd"])
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set" and "${" not in argv[i + 1]]
        section = argv[argv.index("--section") + 1] if "--section" in argv else None
        name = section or _command(stage).replace("-", "_")
        cfg = load_section(classes[_command(stage)], params, name, parse_overrides(sets), shared=section is None)
        check_modality(cfg, _modality(stage))
        checked += section is not None
    assert checked >= 10


# ---- (b) make clean ----------------------------------------------------------------------


def _clean_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^clean\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_clean_removes_every_output_folder():
    removed = set()
    for line in _clean_recipe():
        argv = shlex.split(line)
        if argv[:2] in (["rm", "-rf"], ["rm", "-fr"]):
            removed.update(a.rstrip("/") for a in argv[2:])
    assert removed, "no `rm -rf` in the clean recipe"
    tops = {Path(o).parts[0] for o in ALL_OUTPUTS}
    assert tops <= removed, f"make clean leaves {sorted(tops - removed)}"
    assert "dvc.lock" in removed
    assert not removed & {"stages", "distilcli", "tests", "params.yaml", "dvc.yaml", ".dvc", "."}, removed


# ---- (c) dynamic: dvc status in a copy of the repo ---------------------------------------


def _placeholder(repo: Path, out: str) -> None:
    path = repo / out
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"placeholder for {out}\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "placeholder.txt").write_text(f"placeholder for {out}\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The tracked files of the working tree (the default pipeline's) in a fresh git repo, placeholder outputs committed to DVC."""
    repo = tmp_path_factory.mktemp("contract") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        src = ROOT / name
        if name.startswith("pipelines/"):  # the other pipelines have outputs of their own (test_smollm2_pipeline.py)
            continue
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    run = repo_shell(repo, timeout=300)

    def status(cli: bool = False) -> dict:
        """`dvc status --json`; in-process by default (the same answer, without dvc's start-up)."""
        if cli:
            return json.loads(run(sys.executable, "-m", "dvc", "status", "--json") or "{}")
        from dvc.repo import Repo

        here = os.getcwd()
        os.chdir(repo)  # stage names come out relative to the cwd
        try:
            with Repo(str(repo)) as r:
                return r.status()
        finally:
            os.chdir(here)

    assert "analytics = false" in (repo / ".dvc" / "config").read_text()
    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "contract")
    for out in ALL_OUTPUTS:
        _placeholder(repo, out)
    run(sys.executable, "-m", "dvc", "commit", "-f", "-q")
    return repo, run, status


def _stale_after_touching(repo_fixture, relpath: str) -> set[str]:
    repo, _, status = repo_fixture
    path = repo / relpath
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# touched by test_dvc_contract\n")
        return set(status())
    finally:
        path.write_bytes(original)


def test_placeholders_commit_to_a_clean_status(repo):
    _, _, status = repo
    assert status(cli=True) == {}
    assert status() == {}


def test_cli_status_lists_the_stale_stages_and_what_changed(repo):
    repo_dir, _, status = repo
    path = repo_dir / "stages" / "diffusion" / "distill.py"
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# touched\n")
        shown = status(cli=True)
    finally:
        path.write_bytes(original)
    assert set(shown) == {s for s in STAGES if _modality(s) == "diffusion"}
    for stage, changes in shown.items():
        assert {"changed deps": {"stages/diffusion": "modified"}} in changes, (stage, changes)


@pytest.mark.parametrize(
    "relpath, modality",
    [
        ("stages/lm/distill.py", "lm"),
        ("stages/diffusion/distill.py", "diffusion"),
        ("stages/classifier/distill.py", "classifier"),
        ("stages/lm/moe/__init__.py", "lm"),
    ],
)
def test_editing_a_modality_package_reruns_exactly_its_stages(repo, relpath, modality):
    stale = _stale_after_touching(repo, relpath)
    assert stale == {s for s in STAGES if _modality(s) == modality}  # (the next test sees the revert: exact sets too)


@pytest.mark.parametrize("relpath", ["stages/config.py", "stages/modality.py", "stages/artifacts/schemas.py"])
def test_editing_the_shared_ground_reruns_every_stage(repo, relpath):
    assert _stale_after_touching(repo, relpath) == set(STAGES)


def test_editing_a_router_reruns_exactly_its_commands_stages(repo):
    assert _stale_after_touching(repo, "stages/select.py") == {s for s in STAGES if _command(s) == "select"}
    assert _stale_after_touching(repo, "stages/cascade.py") == {"cascade", "lm_cascade"}


def test_editing_a_param_reruns_its_stages_only(repo):
    repo_dir, _, status = repo
    params = repo_dir / "params.yaml"
    original = params.read_text()
    try:
        loaded = yaml.safe_load(original)
        loaded["lm_select"]["by"] = "majority"
        params.write_text(yaml.safe_dump(loaded))
        assert set(status()) == {"lm_select"}
    finally:
        params.write_text(original)


def test_make_clean_removes_every_output_and_nothing_else(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for keep in ("stages/config.py", "params.yaml", "dvc.yaml", ".dvc/config"):
        (tmp_path / keep).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / keep).write_text("keep\n")
    for out in ALL_OUTPUTS:
        _placeholder(tmp_path, out)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    proc = subprocess.run(["make", "-s", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for out in ALL_OUTPUTS:
        assert not (tmp_path / Path(out).parts[0]).exists(), f"make clean left {out}"
    assert not (tmp_path / "dvc.lock").exists()
    for keep in ("stages/config.py", "params.yaml", "dvc.yaml", ".dvc/config"):
        assert (tmp_path / keep).exists(), f"make clean removed {keep}"
