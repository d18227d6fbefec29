"""Tiny helpers shared by the benchmarks: a median timer, interleaved repeated timing with
per-round ratios, a one-JSON-line emitter, a paired comparison over seeds, and a work
directory whose finished steps a rerun can reuse."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def seed_list() -> list[int]:
    """The seeds a multi-seed benchmark runs: ``BENCH_SEED_LIST=1,2`` runs those (one seed a
    process, in a kept ``workdir``, aggregated by a later run); else 0 .. ``BENCH_SEEDS`` - 1."""
    listed = [x for x in os.environ.get("BENCH_SEED_LIST", "").split(",") if x]
    return [int(x) for x in listed] if listed else list(range(int(os.environ.get("BENCH_SEEDS", "3"))))


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Seconds per call of each of ``fns``: one warm-up call each, then ``rounds`` rounds that call
    every one once, the order rotated each round (so none always runs first or after the same one)."""
    names, times = list(fns), {n: [] for n in fns}
    for n in names:
        fns[n]()
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def ratios(times: dict, base: str) -> dict:
    """Per variant: the median (and min, max) over rounds of its time over ``base``'s in the same round."""
    out = {}
    for n, ts in times.items():
        per_round = [t / b for t, b in zip(ts, times[base], strict=True)]
        out[n] = {"ratio": statistics.median(per_round), "spread": [min(per_round), max(per_round)],
                  "seconds": statistics.median(ts)}  # fmt: skip
    return out


def paired(a: list[float], b: list[float], level: float = 0.95) -> dict[str, object]:
    """``a`` against ``b`` over the same seeds: the mean of the per-seed differences, its
    Student-t interval at ``level`` and whether that interval excludes zero (one seed: no interval)."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean_diff": mean, "interval": None, "excludes_zero": None, "seeds": len(diffs)}
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    lo, hi = mean - half, mean + half
    return {"mean_diff": mean, "interval": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0), "seeds": len(diffs)}


def paired_cell(p: dict, spec: str = "+.3f") -> str:
    """A ``paired`` result as "+mean [low, high]" for a table cell (one seed: the mean alone)."""
    return f"{p['mean_diff']:{spec}}" + (f" [{p['interval'][0]:{spec}}, {p['interval'][1]:{spec}}]" if p["interval"] else "")


def emit(name: str, **fields: object) -> None:
    """Print one JSON object, ``{"bench": name, **fields}``, on its own line to stdout."""
    print(json.dumps({"bench": name, **fields}), file=sys.stdout, flush=True)


RESULTS = Path(__file__).resolve().parent / "results"


def merged_seeds(stems: list[str], results: Path = RESULTS) -> tuple[list[int], dict[str, dict[str, list]]]:
    """The seeds and per-seed rows of earlier runs of one benchmark, each run one seed or more
    (``bench/results/<stem>.json`` with ``seeds`` and ``per_seed``: row -> metric -> one value a
    seed, e.g. from ``BENCH_SEED_LIST=1``), appended in the order given; a seed in two runs is an error."""
    seeds: list[int] = []
    rows: dict[str, dict[str, list]] = {}
    for stem in stems:
        path = results / f"{stem}.json"
        if not path.exists():
            raise SystemExit(f"no {path}: run that seed first (BENCH_SEED_LIST=N writes <bench>_seedN)")
        got = json.loads(path.read_text())
        seeds += got["seeds"]
        for row, cols in got["per_seed"].items():
            for m, values in cols.items():
                rows.setdefault(row, {}).setdefault(m, []).extend(values)
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the runs {stems} share seeds {seeds}: each seed must come from one run")
    return seeds, rows


def merged_run(name: str, report: Callable[[list[int], dict], tuple[dict, list[str]]]) -> bool:
    """With ``BENCH_MERGE=<name>_seed0,<name>_seed1,...``: ``report`` (seeds, rows -> summary,
    markdown lines) of those runs' ``merged_seeds``, written as ``<name>``; False without it."""
    merge = [x for x in os.environ.get("BENCH_MERGE", "").split(",") if x]
    if merge:
        out, lines = report(*merged_seeds(merge))
        write_results(name, {**out, "merged_from": merge}, lines)
    return bool(merge)


def seed_results_name(name: str, seeds: list[int]) -> str:
    """``name`` for a run of several seeds, ``<name>_seed<N>`` for one (what ``merged_run`` reads)."""
    return name if len(seeds) > 1 else f"{name}_seed{seeds[0]}"


def write_results(name: str, out: dict, lines: list[str] | None = None, results: Path = RESULTS) -> None:
    """``bench/results/<name>.json`` (and ``.md`` from ``lines``), then the one JSON line on stdout."""
    results.mkdir(exist_ok=True)
    if lines is not None:
        (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    (results / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    emit(name, **out)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """Where a benchmark keeps its models: ``BENCH_WORKDIR`` when set (kept, so ``cached``
    steps are reused by a rerun), else a temporary directory removed at the end."""
    kept = os.environ.get("BENCH_WORKDIR")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def cached(out: Path, settings: object, step: Callable[[], object]) -> Path:
    """Run ``step`` (which writes ``out``) unless ``out`` exists from a run with the same
    ``settings`` (compared by their repr, kept next to it): reruns in a kept ``workdir``
    redo only what changed. Without a kept workdir ``out`` never exists beforehand."""
    stamp = out.with_name(out.name + ".settings")
    key = repr(settings)
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    if out.exists():
        shutil.rmtree(out)
    step()
    stamp.write_text(key)
    return out


def lm_teacher_chain(params: dict, seed: int, d: Path, task: str) -> tuple:
    """The default pipeline's LM chain in ``d``, each step cached: the teacher (``lm_teacher``), its
    teacher data (``lm_generate``) and the label-free selection (``lm_select``). Returns their
    configs (what the later steps' ``cached`` settings depend on); the outputs are ``d / teacher``,
    ``d / td`` and ``d / sel``."""
    from dataclasses import replace

    from stages import distill, generate_teacher_data, select
    from stages.config import DataConfig, DistillConfig, GenerateTeacherDataConfig, SelectConfig, load_section

    data = load_section(DataConfig, params, "data")
    teacher = replace(load_section(DistillConfig, params, "lm_teacher"), seed=seed)
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, task, d / "teacher", data_cfg=data, progress=False))
    gen = replace(load_section(GenerateTeacherDataConfig, params, "lm_generate"), seed=seed)
    cached(d / "td", (teacher, gen), lambda: generate_teacher_data.run(gen, d / "teacher", task, d / "td", data_cfg=data,
                                                                       progress=False))  # fmt: skip
    sel = load_section(SelectConfig, params, "lm_select")
    cached(d / "sel", (teacher, gen, sel), lambda: select.run(sel, d / "td", d / "sel", progress=False))
    return teacher, gen, sel


def lm_accuracies(params: dict, models: dict[str, Path], task: str, out: Path, data_cfg) -> dict[str, float]:
    """Test accuracy of each named LM (the task's scorer, ``lm_evaluate`` settings) in one evaluate run."""
    import io

    from rich.console import Console

    from stages import evaluate
    from stages.config import EvaluateConfig, load_section

    ev = evaluate.run(load_section(EvaluateConfig, params, "lm_evaluate"), list(models.values()), task, out,
                      data_cfg=data_cfg, console=Console(file=io.StringIO()))  # fmt: skip
    metrics = json.loads((ev / "metrics.json").read_text())
    return {name: metrics[path.name]["accuracy"] for name, path in models.items()}


def accuracy_table(acc: dict[str, list[float]], seeds: int) -> str:
    """Markdown: per model its mean ± std over seeds and the per-seed values."""
    lines = [f"| model | test accuracy (mean ± std over {seeds} seeds) | per seed |", "|---|---|---|"]
    for name, xs in acc.items():
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(xs):.3f} ± {std:.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")
    return "\n".join(lines) + "\n"
