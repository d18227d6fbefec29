"""Reruns are reproducible: the same commands on the same inputs, params and seed on CPU
write byte-identical tables (Parquet) and tensors (safetensors), for every command of
every modality (diffusion has no select or cascade).

Each tiny chain runs into ``<root>/run`` in this process, is moved to ``<root>/first``, and
runs again into ``<root>/run`` in a fresh interpreter with another hash seed (set order,
global RNG state and imports start over). Reruns into the same path record the same
command line and input paths, so only what the run itself does could differ. Then:

- every ``.parquet`` and ``.safetensors`` file is byte-identical;
- every manifest is identical apart from its ``timing`` entry, which holds ``created`` and
  the wall-clock measurements (``stages.artifacts.provenance``) and nothing else;
- every other JSON and CSV file is equal once timing entries / columns are dropped, and
  every remaining file is byte-identical, but ``summary.txt`` (metrics.json printed as a
  table, timing column included).

One intra-op thread in both runs: a float reduction split across another thread count
may round differently, and the tiny models run fastest on one thread anyway.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from conftest import Cli, write_params

from stages.artifacts import MANIFEST, TIMING, is_timing, join_timing, split_timing, write_manifest


def distil(cli: Cli, *args) -> None:
    """``distil <args>`` in-process, with ``sys.argv`` as the console script sees it, so the
    manifests record the command a user would have typed (the same in both runs)."""
    with mock.patch.object(sys, "argv", ["distil", *map(str, args), "--params", str(cli.params)]):
        cli.ok(*args)


def classifier_chain(root: Path) -> Path:
    """All five commands on digits with the shared tiny params; returns the run folder."""
    c, d = Cli(write_params(root)), root / "run"
    distil(c, "distill", "--section", "teacher", "--data", "digits", "--out", d / "teacher", "-q")
    distil(c, "generate-teacher-data", "--teacher", d / "teacher", "--data", "digits", "--out", d / "tdata", "-q")
    distil(c, "select", d / "tdata", "--out", d / "sel", "-q")
    distil(c, "distill", "--method", "kd", "--data", d / "sel", "--out", d / "student", "-q")
    distil(c, "cascade", "--student", d / "student", "--teacher", d / "teacher", "--data", d / "tdata", "--out", d / "casc", "-q")
    distil(c, "evaluate", "--model", d / "teacher", "--model", d / "student", "--cascade", d / "casc", "--data", d / "tdata",
           "--out", d / "ev", "-q")  # fmt: skip
    return d


LM = ["--set", "data.sizes=[60,10,10]", "--set", "lm.hidden=32", "--set", "lm.layers=1", "--set", "lm.heads=2",
      "--set", "lm.vocab_size=320", "--set", "batch_size=16", "--set", "lr=0.01", "-q"]  # fmt: skip
SAMPLE = ["--set", "samples=2", "--set", "max_new_tokens=6", "-q"]  # temperature 1.0 (the default): seeded sampling


def lm_chain(root: Path) -> Path:
    """All five commands on basic_arithmetic with tiny Llamas, sampled teacher data and a
    self-consistency cascade; returns the run folder."""
    c, d = Cli(write_params(root)), root / "run"
    distil(c, "distill", "--method", "sft", "--data", "basic_arithmetic", "--out", d / "teacher", "--set", "epochs=2", *LM)
    distil(c, "generate-teacher-data", "--teacher", d / "teacher", "--data", "basic_arithmetic", "--out", d / "tdata",
           "--set", "data.sizes=[60,10,10]", "--set", "top_k=8", "--set", "shard_prompts=32", *SAMPLE)  # fmt: skip
    distil(c, "select", d / "tdata", "--by", "majority+dedup", "--out", d / "sel", "-q")
    distil(c, "distill", "--method", "kd", "--data", d / "sel", "--out", d / "student", "--set", "epochs=1", *LM)
    distil(c, "cascade", "--student", d / "student", "--teacher", d / "teacher", "--data", d / "tdata", "--out", d / "casc",
           "--policy", "sc-cascade", *SAMPLE)  # fmt: skip
    distil(c, "evaluate", "--model", d / "teacher", "--model", d / "student", "--data", d / "tdata", "--out", d / "ev", *SAMPLE)
    return d


NET = {"width": 32, "depth": 1, "eval_samples": 64, "checkpoint_every": 5}
DIFFUSION = {
    "data": {"sizes": [200, 50, 100], "limit": 0, "split_seed": 0},
    "diffusion_teacher": {"method": "denoise", "steps": 40, "batch_size": 64, "lr": 0.003, "diffusion": NET},
    "diffusion_student": {"method": "consistency-distill", "steps": 20, "batch_size": 64, "lr": 0.003,
                          "diffusion": {**NET, "skip": 50}},
    "trajectory": {"method": "trajectory", "steps": 20, "batch_size": 64, "lr": 0.003, "diffusion": NET},
    "generate_teacher_data": {"steps": 10, "noise_samples": 64, "shard_samples": 32, "save_every": 1, "batch_size": 32},
}  # fmt: skip


def diffusion_chain(root: Path) -> Path:
    """A moons teacher, its trajectories, a consistency student (live teacher) and a
    trajectory student (from the stored trajectories), all evaluated with timing on."""
    c, d = Cli(write_params(root, **DIFFUSION)), root / "run"
    distil(c, "distill", "--section", "diffusion_teacher", "--data", "moons", "--out", d / "teacher", "-q")
    distil(c, "generate-teacher-data", "-t", d / "teacher", "--data", "moons", "--out", d / "traj", "-q")
    distil(c, "distill", "--section", "diffusion_student", "-t", d / "teacher", "--data", "moons", "--out", d / "student", "-q")
    distil(c, "distill", "--section", "trajectory", "-t", d / "teacher", "--data", d / "traj", "--out", d / "tstudent", "-q")
    distil(c, "evaluate", "--model", d / "teacher", "--model", d / "student", "--model", d / "tstudent", "--data", "moons",
           "--out", d / "ev", "--set", "step_counts=[1,2]", "--set", "n_samples=100", "--set", "time_samples=16",
           "--set", f"teacher={d / 'teacher'}", "--set", "teacher_steps=4", "-q")  # fmt: skip
    return d


CHAINS: dict[str, Callable[[Path], Path]] = {"classifier": classifier_chain, "lm": lm_chain, "diffusion": diffusion_chain}
OUTPUTS = {"classifier": {"teacher", "tdata", "sel", "student", "casc", "ev"}, "lm": {"teacher", "tdata", "sel", "student", "casc", "ev"},
           "diffusion": {"teacher", "traj", "student", "tstudent", "ev"}}  # fmt: skip

RERUN = """import sys, torch
from pathlib import Path
sys.path[:0] = [{tests!r}, {here!r}]
torch.set_num_threads(1)
import test_determinism as t
for m, root in {roots!r}.items():
    t.CHAINS[m](Path(root))
"""


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per modality (first run, rerun into the same path in a fresh interpreter)."""
    import torch

    roots = {m: tmp_path_factory.mktemp(f"rerun_{m}") for m in CHAINS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m, chain in CHAINS.items():
            shutil.move(chain(roots[m]), roots[m] / "first")
    finally:
        torch.set_num_threads(threads)
    here = Path(__file__).parent
    script = RERUN.format(tests=str(here.parent), here=str(here), roots={m: str(r) for m, r in roots.items()})
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {m: (r / "first", r / "run") for m, r in roots.items()}


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _untimed(obj):
    """``obj`` without timing entries, in dicts nested anywhere (training histories too)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _csv_untimed(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if not is_timing(k)} for row in csv.DictReader(fh)]


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    return [leaf for k, v in tree.items() for leaf in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])]


MODALITIES = pytest.mark.parametrize("modality", list(CHAINS))


@MODALITIES
def test_reruns_write_byte_identical_tables_and_tensors(reruns, modality):
    first, second = (_files(r) for r in reruns[modality])
    assert set(first) == set(second)
    assert {name.split("/")[0] for name in first} == OUTPUTS[modality]  # every command wrote its output
    binary = [name for name in first if name.endswith((".parquet", ".safetensors"))]
    assert any(n.endswith(".parquet") for n in binary) and any(n.endswith(".safetensors") for n in binary)
    differ = [name for name in binary if first[name].read_bytes() != second[name].read_bytes()]
    assert not differ, f"{modality}: {differ} differ between two runs of the same commands"


@MODALITIES
def test_rerun_manifests_differ_only_in_their_timing_entry(reruns, modality):
    first, second = reruns[modality]
    manifests = sorted(str(p.relative_to(first)) for p in first.rglob(MANIFEST))
    assert {m.split("/")[0] for m in manifests} == OUTPUTS[modality]  # one manifest per output at least
    for name in manifests:
        a, b = (json.loads((root / name).read_text()) for root in (first, second))
        assert {k: v for k, v in a.items() if k != TIMING} == {k: v for k, v in b.items() if k != TIMING}, name
        assert set(a[TIMING]) == set(b[TIMING]) and "created" in a[TIMING], name
        assert all(is_timing(leaf.split(".")[-1]) for leaf in _leaves(a[TIMING]) if leaf != "created"), name
        assert a["command"].startswith("distil ") and str(first.parent / "run") in a["command"], name  # as typed, in both runs
    teacher = json.loads((first / "teacher" / MANIFEST).read_text())
    assert teacher[TIMING]["training"]["train_seconds"] > 0 and "train_seconds" not in teacher["training"]


@MODALITIES
def test_rerun_json_and_csv_files_agree_apart_from_timing(reruns, modality):
    first, second = (_files(r) for r in reruns[modality])
    checked = 0
    for name, a in first.items():
        b = second[name]
        if name.endswith((".parquet", ".safetensors")) or Path(name).name in (MANIFEST, "summary.txt"):
            continue
        if name.endswith(".json"):
            assert _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text())), name
        elif name.endswith(".csv"):
            assert _csv_untimed(a) == _csv_untimed(b), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
        checked += 1
    assert any(n.endswith("metrics.json") for n in first) and any(n.endswith("training.json") for n in first) and checked > 5


def test_write_manifest_files_every_measurement_under_timing(tmp_path):
    extra = {"task": "digits", "rows_per_second": 9.5, "bytes_per_token": 80.0,
             "training": {"best_epoch": 2, "train_seconds": 1.25},
             "metrics": {"student": {"accuracy": 0.9, "ms_per_1k_rows": 3.0, "tokens_per_second": 7.0},
                         "cascade": {"seconds": 0.5, "seconds_vs_teacher": 0.2, "cost_vs_teacher_seconds": 0.1}}}  # fmt: skip
    m = write_manifest(tmp_path, kind="k", params={"time_samples": 16}, inputs={}, extra=extra)
    assert json.loads((tmp_path / MANIFEST).read_text()) == m
    assert m["task"] == "digits" and m["bytes_per_token"] == 80.0 and m["params"] == {"time_samples": 16}
    assert m["training"] == {"best_epoch": 2} and m["metrics"] == {"student": {"accuracy": 0.9}, "cascade": {}}
    assert m[TIMING] == {"created": m[TIMING]["created"], "rows_per_second": 9.5, "training": {"train_seconds": 1.25},
                         "metrics": {"student": {"ms_per_1k_rows": 3.0, "tokens_per_second": 7.0},
                                     "cascade": {"seconds": 0.5, "seconds_vs_teacher": 0.2, "cost_vs_teacher_seconds": 0.1}}}  # fmt: skip
    joined = join_timing(m)
    assert {k: joined[k] for k in extra} == extra and "created" in joined and TIMING not in joined
    assert split_timing(extra) == (
        {k: v for k, v in m.items() if k in extra},
        {k: v for k, v in m[TIMING].items() if k != "created"},
    )
