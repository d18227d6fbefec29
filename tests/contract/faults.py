"""The fault harness: run `distil ...` as a child process, kill it at a seeded random
moment inside its work, rerun the same command and say how the result differs from an
uninterrupted run's (tables row by row, tensors exactly, dvclive steps, leftovers).

Children are forked from a server that has already imported distil and its heavy
dependencies (torch, transformers, diffusers, dvclive), then run ``distilcli``'s
``__main__`` exactly as ``python -m distilcli`` does: a real process with its own pid that
SIGKILL, SIGINT and SIGTERM reach, for about a tenth of a second instead of the 4-20 s an
interpreter spends importing on a busy 2-core machine. ``DISTIL_FAULT_EXEC=1`` (or
``exec_=True``) starts ``sys.executable -m distilcli`` instead.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from stages.artifacts import MANIFEST

PRELOAD = [
    "distilcli.app", "stages.runlog", "faults",
    *(f"stages.{m}.{c}" for m in ("classifier", "lm", "diffusion") for c in ("teacher_data", "select", "distill", "cascade", "evaluate")),
    "stages.lm.training", "stages.diffusion.training", "stages.diffusion.generator",
    "sklearn.datasets", "scipy.stats", "matplotlib.pyplot", "dvclive", "dvc.repo", "reasoning_gym", "accelerate", "gguf",
    "transformers.models.llama.modeling_llama", "transformers.generation.utils", "diffusers.models", "diffusers.schedulers",
    "pydantic", "scmrepo.git", "dvc.scm",
]  # fmt: skip
"""What the server imports before it forks: distil's stage modules and what they import
lazily (a missing one is skipped)."""
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Children compute on one thread: tiny models run fastest so on shared cores, and the
reference and the rerun see the same thread count (so the same float sums)."""

_server: multiprocessing.context.BaseContext | None = None


def _forkserver() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started once with THREADS in its environment
    (OpenMP reads them when torch loads, so they must be set before the server imports it)."""
    global _server
    if _server is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = {k: os.environ.get(k) for k in THREADS}
        os.environ.update(THREADS)
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        _server = ctx
    return _server


def _child(argv: list[str], log: str) -> None:
    """In the forked child: output to ``log``, then ``python -m distilcli ARGV``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVCLIVE_OPEN": "false", **THREADS})
    sys.argv = ["distil", *argv]
    runpy.run_module("distilcli", run_name="__main__", alter_sys=True)


def ctrl_c_reaches_child() -> None:
    """``preexec_fn`` for a child a test sends SIGINT: the default disposition, as at a terminal.

    A suite started in the background (``cmd &``, nohup, some CI runners) inherits SIGINT ignored,
    and Python then never raises KeyboardInterrupt in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """One `distil` process: ``pid``, ``alive()``, ``signal(sig)``, ``wait() -> exit code``
    (negative: the signal that ended it), ``output()``."""

    def __init__(self, argv: list[str], log: Path, *, exec_: bool | None = None):
        self.log = Path(log)
        exec_ = os.environ.get("DISTIL_FAULT_EXEC") == "1" if exec_ is None else exec_
        if exec_:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVCLIVE_OPEN": "false", **THREADS}
            with open(self.log, "wb") as out:
                self._proc = subprocess.Popen([sys.executable, "-m", "distilcli", *argv], env=env, stdout=out, stderr=out,
                                              preexec_fn=ctrl_c_reaches_child)  # fmt: skip
            self.pid = self._proc.pid
        else:
            self._proc = _forkserver().Process(target=_child, args=(list(argv), str(self.log)), daemon=True)
            self._proc.start()
            self.pid = self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None if isinstance(self._proc, subprocess.Popen) else self._proc.is_alive()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 600) -> int:
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.wait(timeout)
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
            raise TimeoutError(f"distil did not finish in {timeout} s:\n{self.output()[-2000:]}")
        return self._proc.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def wait_for(path: Path, child: Child, timeout: float = 300) -> float | None:
    """Seconds until ``path`` exists (None if the child ended first)."""
    t0 = time.perf_counter()
    while not path.exists():
        if not child.alive() or time.perf_counter() - t0 > timeout:
            return None
        time.sleep(0.005)
    return time.perf_counter() - t0


@dataclass
class Timed:
    """An uninterrupted run: its work lasts ``work_s``, from its partial's appearance to its exit."""

    out: Path
    startup_s: float
    work_s: float


def run_to_end(argv: list[str], out: Path, log: Path) -> Timed:
    """Run ``argv`` (which writes ``out``) uninterrupted; fail with its output unless it succeeds."""
    t0 = time.perf_counter()
    child = Child(argv, log)
    seen = wait_for(partial_of(out), child)
    started = time.perf_counter() - t0
    rc = child.wait()
    end = time.perf_counter() - t0
    assert rc == 0 and out.exists(), f"distil {' '.join(argv)}: exit {rc}\n{child.output()[-3000:]}"
    startup = end if seen is None else started
    return Timed(out, startup, end - startup)


def kill_delays(name: str, n: int, work_s: float, seed: int = 0) -> list[float]:
    """n seconds drawn uniformly over (0, work_s), seeded by the stage's name and ``seed``."""
    rng = random.Random(f"{seed}:{name}")
    return [rng.uniform(0.0, work_s) for _ in range(n)]


@dataclass
class Kill:
    """What a kill did: ``landed`` (the process was still running when signalled), its exit
    code, ``delay`` (after the partial appeared), ``tries`` (earlier draws that came too late)."""

    landed: bool
    rc: int
    delay: float
    tries: int
    output: str


def kill_once(argv: list[str], out: Path, log: Path, delay: float, sig: int = signal.SIGKILL, tries: int = 4) -> Kill:
    """Start ``argv``, wait for its partial, sleep ``delay``, send ``sig``. A draw that comes
    after the process finished its work (it exits 0) is retried at half the delay on a fresh
    output, so every point ends in a kill that landed (the last of ``tries`` kills at once)."""
    for attempt in range(tries):
        d = 0.0 if attempt == tries - 1 else delay / 2**attempt
        child = Child(argv, log)
        if wait_for(partial_of(out), child) is not None:
            time.sleep(d)
            if child.alive():
                child.signal(sig)
        rc = child.wait()
        if rc != 0:
            return Kill(rc == -sig, rc, d, attempt, child.output())
        _remove(out)
    return Kill(False, 0, 0.0, tries, child.output())


def _remove(out: Path) -> None:
    import shutil

    for p in (out, partial_of(out)):
        shutil.rmtree(p, ignore_errors=True)


# ---- comparing a rerun with the uninterrupted run -------------------------------------------


@dataclass
class Diff:
    """How a rerun's output differs from the reference. Empty lists and zero counts: identical."""

    rows: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    tensors: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupt or self.tensors or self.logs or self.leftovers or self.other)


def table_rows(path: Path) -> pa.Table:
    """Every part of a distil table (``part-*.parquet``), concatenated in file order."""
    parts = sorted(Path(path).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def diffusion_rows(path: Path) -> pa.Table:
    """Diffusion teacher data with each index row's stored state as a ``state`` column, so a
    row compares equal only if the trajectory state it points at does too."""
    table = table_rows(path)
    shards = {}
    states = []
    for shard, offset in zip(table.column("shard").to_pylist(), table.column("offset").to_pylist(), strict=True):
        if shard not in shards:
            shards[shard] = load_file(str(Path(path) / "_states" / f"shard-{shard:05d}.safetensors"))["states"]
        states.append(shards[shard][offset].flatten().tolist())
    return table.drop_columns(["shard", "offset"]).append_column("state", pa.array(states, pa.list_(pa.float32())))


def compare_tables(got: pa.Table, ref: pa.Table, keys: list[str], diff: Diff) -> None:
    """Rows keyed by ``keys``: lost (in ref only), duplicated (a key more than once), corrupt
    (same key, other values, or other columns)."""
    if got.schema.names != ref.schema.names:
        diff.other.append(f"columns {got.schema.names} != {ref.schema.names}")
        return

    def keyed(t: pa.Table) -> tuple[Counter, dict]:
        rows = t.to_pylist()
        count = Counter(tuple(r[k] for k in keys) for r in rows)
        return count, {tuple(r[k] for k in keys): r for r in rows}

    got_n, got_rows = keyed(got)
    ref_n, ref_rows = keyed(ref)
    diff.rows += ref.num_rows
    diff.lost += sum(1 for k in ref_n if k not in got_n)
    diff.duplicated += sum(n - 1 for n in got_n.values() if n > 1)
    diff.corrupt += sum(1 for k in ref_rows if k in got_rows and not _same(got_rows[k], ref_rows[k]))
    diff.corrupt += sum(1 for k in got_n if k not in ref_n)  # rows the reference never had


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compare_tensors(got: Path, ref: Path, diff: Diff) -> None:
    """Every ``*.safetensors`` file of the reference, tensor by tensor, exactly."""
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.safetensors"))
    if sorted(p.relative_to(got) for p in got.rglob("*.safetensors")) != files:
        diff.tensors.append(f"files {sorted(p.relative_to(got) for p in got.rglob('*.safetensors'))} != {files}")
        return
    for rel in files:
        a, b = load_file(str(got / rel)), load_file(str(ref / rel))
        if a.keys() != b.keys():
            diff.tensors.append(f"{rel}: tensor names differ")
        diff.tensors += [f"{rel}:{k}" for k in sorted(a.keys() & b.keys()) if not torch.equal(a[k], b[k])]


def compare_logs(got: Path, ref: Path, diff: Diff) -> None:
    """dvclive series (``dvclive/plots/metrics/**/*.tsv``): the same files, the steps
    0, 1, 2, ... with no gap or repeat, and the same values at every step."""
    files = sorted(p.relative_to(ref) for p in ref.rglob("dvclive/plots/metrics/**/*.tsv"))
    if sorted(p.relative_to(got) for p in got.rglob("dvclive/plots/metrics/**/*.tsv")) != files:
        diff.logs.append("dvclive metric files differ")
        return
    for rel in files:
        a, b = _tsv(got / rel), _tsv(ref / rel)
        steps = [r["step"] for r in a]
        if steps != [str(i) for i in range(len(steps))]:
            diff.logs.append(f"{rel}: steps {' '.join(steps)}")
        elif [(r["step"], r[rel.stem]) for r in a] != [(r["step"], r[rel.stem]) for r in b]:
            diff.logs.append(f"{rel}: {len(a)} rows, the reference {len(b)}, or other values")


def _tsv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


TIMING = ("seconds", "per_second", "ms_per", "throughput", "latency", "samples_per_second", "_ms", "wall")


def untimed(obj):
    """A JSON value without its wall-clock entries (keys naming seconds, rates or latencies)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def compare_json(got: Path, ref: Path, names: list[str], diff: Diff) -> None:
    """JSON files of the output, equal once their timings are dropped."""
    for name in names:
        a, b = (untimed(json.loads((d / name).read_text())) for d in (got, ref))
        if a != b:
            diff.other.append(f"{name} differs")


def compare_files(got: Path, ref: Path, diff: Diff) -> None:
    """The same files, by relative path: nothing a killed run wrote survives its rerun."""
    a, b = ({str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} for d in (got, ref))
    if a - b:
        diff.other.append(f"files only in the rerun: {sorted(a - b)}")
    if b - a:
        diff.other.append(f"files missing from the rerun: {sorted(b - a)}")


def leftovers(out: Path) -> list[str]:
    """What a finished output must not hold: its partial, temp files of interrupted writes,
    resume scratch (checkpoints) and files a rerun's restart left from the killed run."""
    found = [str(partial_of(out))] if partial_of(out).exists() else []
    found += [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name or p.name == ".fingerprint"]
    found += [s for s in ("checkpoint", "fits") if (out / s).exists()]
    return found


def manifest_rows(out: Path) -> int | None:
    f = Path(out) / MANIFEST
    return json.loads(f.read_text()).get("rows") if f.exists() else None
