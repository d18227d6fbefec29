"""``dvc repro`` with independent stages running at once.

    python pipelines/repro.py [--jobs N] [TARGET ...]      (targets default to ./dvc.yaml)

DVC runs a pipeline's stages one after another (iterative/dvc#755), but its locks are per
stage: the repository lock is released while a stage's command runs, and each stage holds
read locks on its dependencies and a write lock on its outputs. So separate
``dvc repro --single-item STAGE`` processes of stages that do not depend on each other may
run together. This script reads the pipeline's graph from DVC, starts each stage once every
stage upstream of it has finished, at most ``--jobs`` at a time (the stage with the most
stages downstream of it first), and gives each process ``cores / jobs`` torch threads. The
outputs, the cache and ``dvc.lock`` are those of one ``dvc repro``; a stage that is already
up to date is checked and skipped by DVC itself. A failed stage stops new launches, the
running ones finish, and the script exits with DVC's exit code for it. Ctrl-C (SIGINT to the
script) is passed on to every running stage's process group and the script exits 130; a rerun
finishes the pipeline (distil's stages resume their partial work).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage_graph(targets: list[str]) -> tuple[list[str], dict[str, set[str]]]:
    """(stage names in dvc.yaml order, each stage's upstream stages) for ``targets`` and
    everything they depend on; stages without a command (``.dvc`` files) are left out."""
    from dvc.repo import Repo

    with Repo() as repo:
        graph = repo.index.graph
        stages = []
        for target in targets:
            for stage in repo.stage.collect(target, with_deps=True):
                if stage not in stages:
                    stages.append(stage)
        stages = [s for s in stages if getattr(s, "cmd", None)]
        names = {s: s.addressing for s in stages}
        upstream = {names[s]: {names[d] for d in _ancestors(graph, s) if d in names} for s in stages}
    return [names[s] for s in stages], upstream


def _ancestors(graph, stage) -> set:
    """The stages ``stage`` depends on, directly or not (DVC's edges point to dependencies)."""
    import networkx as nx

    return set(nx.descendants(graph, stage))


def schedule_order(names: list[str], upstream: dict[str, set[str]]) -> list[str]:
    """Launch priority: stages with more stages downstream of them first (they hold up more of
    the pipeline), ties in file order."""
    downstream = {n: sum(n in upstream[m] for m in names) for n in names}
    return sorted(names, key=lambda n: (-downstream[n], names.index(n)))


def run(names: list[str], upstream: dict[str, set[str]], jobs: int, dvc: str, echo=print) -> int:
    """Run every stage once all its upstream stages are done, ``jobs`` at a time; the exit code
    (DVC's for the first failure, 130 on Ctrl-C after the running stages were stopped)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // jobs)))
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    order, done, running, failed, start = schedule_order(names, upstream), set(), {}, 0, time.monotonic()
    try:
        while order or running:
            ready = [n for n in order if upstream[n] <= done] if not failed else []
            while ready and len(running) < jobs:
                name = ready.pop(0)
                order.remove(name)
                log = tempfile.TemporaryFile(mode="w+")
                cmd = [dvc, "--wait-for-lock", "repro", "--quiet", "--single-item", name]
                # each stage in its own session: on Ctrl-C the runner signals the stage's whole group (dvc and its command)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[name] = (proc, log, time.monotonic())
            if failed and not running:
                break
            time.sleep(0.2)
            for name in [n for n, (proc, _, _) in running.items() if proc.poll() is not None]:
                proc, log, began = running.pop(name)
                log.seek(0)
                text = log.read().strip()
                log.close()
                if proc.returncode:
                    failed = failed or proc.returncode
                    echo(f"stage '{name}' failed (`dvc repro {name}` exited {proc.returncode}):" + (f"\n{text}" if text else ""))
                else:
                    done.add(name)
                    echo(
                        f"stage '{name}' done in {time.monotonic() - began:.0f} s"
                        + ("\n  " + text.replace("\n", "\n  ") if text else "")
                    )
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # distil stops cleanly, leaving a resumable partial
        for proc, _, _ in running.values():
            proc.wait()
        echo("interrupted: rerun to finish (stages resume where they stopped)")
        return 130
    if failed:
        echo("not started after the failure: " + (", ".join(order) or "none"))
    else:
        echo(f"{len(done)} stages in {time.monotonic() - start:.0f} s, {jobs} at a time")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=["dvc.yaml"], help="dvc.yaml files or stage names (default ./dvc.yaml)")
    parser.add_argument("--jobs", "-j", type=int, default=len(os.sched_getaffinity(0)), help="stages at once (default: cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    names, upstream = stage_graph(args.targets)
    dvc = str(Path(sys.executable).with_name("dvc"))
    return run(names, upstream, args.jobs, dvc if Path(dvc).exists() else "dvc", echo=lambda s: print(s, flush=True))


if __name__ == "__main__":
    sys.exit(main())
