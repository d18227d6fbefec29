"""Teachers anywhere, measured in one process: the demo's LM teacher behind `distil serve`'s
app (uvicorn on 127.0.0.1) and the HTTP teacher that talks to it.

- throughput of ``HTTPTeacher.generate`` at concurrency 8 over concurrency 1 (the server
  batches concurrent requests into one forward pass), interleaved and repeated, for the
  demo's teacher and for the shipped SmolLM2-135M-Instruct (``BENCH_REAL_TEACHER``);
- HTTP at concurrency 8 over in-process generation (``TransformersTeacher``) of the same
  prompts, interleaved and repeated;
- the served cascade's accuracy against the offline ``distil cascade`` run (same policy
  file, ``seed_per_query``) on the same test queries, and the p50 / p99 latency of
  ``serve`` under 8 concurrent clients sending those queries.

Servers are ``distil serve`` processes on 127.0.0.1 (as users run them), clients this process.

The models are the demo's (params.yaml sections lm_teacher, lm_generate, lm_select,
lm_student, lm_cascade), trained here unless ``BENCH_WORKDIR`` keeps them from a previous
run. Writes ``bench/results/teachers.{md,json}``.

    python -m bench teachers
    BENCH_REPEATS=5 BENCH_WORKDIR=/tmp/teachers python -m bench teachers
    BENCH_REAL_TEACHER= python -m bench teachers     # skip the SmolLM2-135M throughput rounds
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from bench.harness import cached, emit, workdir
from stages import cascade, distill, generate_teacher_data, select
from stages.config import (
    CascadeConfig,
    DataConfig,
    DistillConfig,
    GenerateTeacherDataConfig,
    SelectConfig,
    TeacherConfig,
    load_section,
)

ROOT = Path(__file__).resolve().parents[1]
TASK = "chain_sum"


def _models(params: dict, d: Path) -> dict[str, Path]:
    """The demo's LM teacher, its teacher data and selection, the kd student and its cascade."""
    data = load_section(DataConfig, params, "data")
    teacher = load_section(DistillConfig, params, "lm_teacher")
    cached(d / "teacher", (teacher, data), lambda: distill.run(teacher, TASK, d / "teacher", data_cfg=data, progress=False))
    gen = load_section(GenerateTeacherDataConfig, params, "lm_generate")
    cached(d / "td", (teacher, data, gen), lambda: generate_teacher_data.run(gen, d / "teacher", TASK, d / "td", data_cfg=data, progress=False))
    sel = load_section(SelectConfig, params, "lm_select")
    cached(d / "sel", (teacher, gen, sel), lambda: select.run(sel, d / "td", d / "sel", progress=False))
    student = load_section(DistillConfig, params, "lm_student")
    cached(d / "kd", (teacher, gen, sel, student), lambda: distill.run(student, d / "sel", d / "kd", data_cfg=data, progress=False))
    casc = load_section(CascadeConfig, params, "lm_cascade", {"seed_per_query": True})
    cached(d / "cascade", (teacher, gen, student, casc),
           lambda: cascade.run(casc, d / "kd", d / "teacher", d / "td", d / "cascade", data_cfg=data, progress=False))  # fmt: skip
    return {"teacher": d / "teacher", "td": d / "td", "kd": d / "kd", "cascade": d / "cascade"}


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs)}


@contextlib.contextmanager
def _serving(*args: str):
    """``distil serve ARGS`` in its own process on a free 127.0.0.1 port (as users run it);
    yields its base URL; SIGTERM at the end (it drains and exits 0)."""
    import httpx

    from tests.loopback import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "distilcli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"distil serve exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _throughput(model: str, prompts: list[str], repeats: int) -> dict:
    """Tokens per second of in-process generation and of the HTTP teacher at concurrency 1
    and 8 against `distil serve` (interleaved, ``repeats`` rounds), and their ratios per round."""
    import httpx

    from stages.lm.teachers import Sampling, open_teacher
    from stages.lm.teachers.http import HTTPTeacher

    sampling = Sampling(temperature=0.0, max_new_tokens=6, top_k=20)
    local = open_teacher(model, TeacherConfig(), torch.device("cpu"))
    rates: dict[str, list[float]] = {"in_process": [], "http_c1": [], "http_c8": []}
    with _serving(model) as base:
        clients = {c: HTTPTeacher(f"{base}/v1", TeacherConfig(concurrency=c, tokenizer=model)) for c in (1, 8)}

        def run(name: str) -> None:
            batch = 64 if name == "in_process" else len(prompts)
            gen = local if name == "in_process" else clients[int(name[-1])]
            t0, tokens = time.perf_counter(), 0
            for lo in range(0, len(prompts), batch):
                tokens += sum(c.completion_tokens for c in gen.generate(prompts[lo : lo + batch], 1, sampling))
            rates[name].append(tokens / (time.perf_counter() - t0))

        for name in rates:  # warm-up
            run(name)
            rates[name].clear()
        for r in range(repeats):
            for name in (list(rates) if r % 2 == 0 else list(reversed(rates))):
                run(name)
        health = httpx.get(f"{base}/health").json()
    c8_c1 = [a / b for a, b in zip(rates["http_c8"], rates["http_c1"], strict=True)]
    http_local = [a / b for a, b in zip(rates["http_c8"], rates["in_process"], strict=True)]
    return {"model": model, "tokens_per_second": {k: _spread(v) for k, v in rates.items()}, "http_c8_over_c1": _spread(c8_c1),
            "http_c8_over_in_process": _spread(http_local), "server": health}  # fmt: skip


def _served_cascade(m: dict, clients: int = 8) -> dict:
    """Accuracy of `distil serve --policy-file` on the offline run's test queries, and its
    latency under ``clients`` concurrent clients."""
    import httpx

    from stages.lm.scoring import agree
    from stages.tasks.reasoning import extract_answer

    decisions = pq.read_table(m["cascade"] / "decisions").to_pylist()
    prompts = {r["prompt_id"]: r["prompt"] for r in pq.read_table(m["td"]).to_pylist() if r["split"] == "test"}
    served, latency = {}, []
    lock = threading.Lock()
    args = (str(m["kd"]), "--teacher", str(m["teacher"]), "--policy-file", str(m["cascade"] / "policy.json"))
    with _serving(*args) as base, httpx.Client(base_url=f"{base}/v1", timeout=120) as http:

        def ask(row: dict) -> None:
            t0 = time.perf_counter()
            r = http.post("/completions", json={"model": "cascade", "prompt": prompts[row["id"]], "max_tokens": 6})
            r.raise_for_status()
            with lock:
                latency.append(time.perf_counter() - t0)
                served[row["id"]] = r.json()["choices"][0]

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(ask, decisions))
    same_route = sum(served[r["id"]]["distil"]["route"] == r["route"] for r in decisions)
    same_answer = sum(extract_answer(served[r["id"]]["text"])[0] == r["answer"] for r in decisions)
    served_acc = statistics.fmean(float(agree(extract_answer(served[r["id"]]["text"])[0], r["gold"])) for r in decisions)
    offline_acc = statistics.fmean(float(agree(r["answer"], r["gold"])) for r in decisions)  # chain_sum scores exact match
    offline = json.loads((m["cascade"] / "metrics.json").read_text())
    return {"queries": len(decisions), "offline_accuracy": offline_acc, "served_accuracy": served_acc,
            "same_route": same_route, "same_answer": same_answer, "teacher_rate": offline["teacher_rate"],
            "latency_ms": {"p50": 1000 * float(np.percentile(latency, 50)), "p99": 1000 * float(np.percentile(latency, 99)),
                           "clients": clients}}  # fmt: skip


def _rows(t: dict) -> list[str]:
    def ratio(key: str) -> str:
        return f"{t[key]['median']:.2f}x ({t[key]['min']:.2f}-{t[key]['max']:.2f})"

    name = Path(t["model"]).name
    return [
        *(f"| {name}: tokens/s {k} | {v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f}) |" for k, v in t["tokens_per_second"].items()),
        f"| {name}: HTTP concurrency 8 / 1 | {ratio('http_c8_over_c1')} |",
        f"| {name}: HTTP c8 / in-process | {ratio('http_c8_over_in_process')} |",
    ]


def _table(out: dict) -> str:
    rows = ["| measure | value (median, min-max over rounds) |", "|---|---|", *_rows(out["throughput"])]
    if "throughput_real" in out:
        rows += _rows(out["throughput_real"])
    c = out["cascade"]
    rows += [
        f"| served cascade accuracy / offline | {c['served_accuracy']:.3f} / {c['offline_accuracy']:.3f} "
        f"(same route {c['same_route']}/{c['queries']}, same answer {c['same_answer']}/{c['queries']}) |",
        f"| serve latency, 8 clients | p50 {c['latency_ms']['p50']:.0f} ms, p99 {c['latency_ms']['p99']:.0f} ms |",
    ]
    return "\n".join(rows) + "\n"


def main() -> int:
    params = yaml.safe_load(Path(os.environ.get("BENCH_PARAMS", ROOT / "params.yaml")).read_text())
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    t0 = time.perf_counter()
    with workdir() as d:
        m = _models(params, d)
        prompts = [r["prompt"] for r in pq.read_table(m["td"]).to_pylist() if r["split"] == "test" and r["sample"] == 0][:128]
        out = {"prompts": len(prompts), "repeats": repeats, "throughput": _throughput(str(m["teacher"]), prompts, repeats)}
        if os.environ.get("BENCH_REAL_TEACHER", "smollm2-135m"):  # the shipped SmolLM2-135M-Instruct: a teacher of real size
            out["throughput_real"] = _throughput(os.environ.get("BENCH_REAL_TEACHER", "smollm2-135m"), prompts[:64], repeats)
        out["cascade"] = _served_cascade(m)
    out["goal_c8_over_c1_5x"] = {k: out[k]["http_c8_over_c1"]["median"] >= 5 for k in ("throughput", "throughput_real") if k in out}
    out["seconds"] = time.perf_counter() - t0
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "teachers.md").write_text(_table(out))
    (results / "teachers.json").write_text(json.dumps(out, indent=2) + "\n")
    emit("teachers", **out)
    return 0
