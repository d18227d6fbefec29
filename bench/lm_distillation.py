"""Language-model distillation costs, measured side by side in one run. Every time is a ratio
from interleaved, repeated runs (each round runs every variant once, in a rotated order, and
each round gives one ratio): the median with the spread (min, max) over rounds.

- ``fused_kd``: the student side of a ``kd`` step (KD on stored top-k, k = 32, mixed with CE;
  the fused, chunked path of ``stages.losses.fused``) over a plain output layer + CE step, from
  hidden states [tokens, 256] at vocabulary 32k and 128k, 2,048 tokens (issue 19: goal time
  <= 1.0x, peak memory <= 0.2x); beside it today's unfused ``kd`` and, when ``trl`` is importable
  (the bench extra), TRL's ``generalized_jsd_loss`` on full teacher logits (goal memory <= 0.05x).
  Peak memory: on GPU ``torch.cuda.max_memory_allocated`` above what was allocated before the
  step; on CPU the peak resident set growth during the step (``VmHWM`` reset through
  ``/proc/self/clear_refs``, minus ``VmRSS`` before it) in a fresh process, with glibc's mmap
  threshold pinned at 64 KiB so freed tensors leave the resident set at once;
- ``kd_step_over_ce_step``: a whole training step of a tiny model, KD from stored top-k mixed
  with CE (as ``top_k_loss`` runs it, fused and unfused) over a plain next-token CE step;
- ``sparse_over_full``: the top-k KD loss against a full-vocabulary KD loss at vocabulary 32k,
  forward + backward time, and the teacher-side memory each reads (target >= 5x);
- ``batched_over_loop_tokens_per_s``: batched teacher generation (batch 16, KV cache) over a
  per-prompt ``generate`` loop (target >= 4x);
- ``on_policy_vs_trl``: seconds per ``on-policy`` step over TRL's ``DistillationTrainer`` step on the
  same tiny models, 6 and 32 new tokens (``bench.on_policy_step``; goal <= 0.8x), with ``trl``;
- ``bytes_per_token_k32``: Parquet bytes per stored teacher token at k = 32 (target <= 200);
- ``rss_10x_over_1x``: peak RSS of ``distill --method kd`` reading 10x the teacher rows over
  1x, each in a fresh process (target <= 1.2: the training loop streams parts).

    python -m bench lm_distillation                 # writes bench/results/lm_distillation.json
    BENCH_QUICK=1 python -m bench lm_distillation   # 256 tokens, 3 rounds, no teacher data: a look, nothing written
    BENCH_CHUNK=128 python -m bench lm_distillation  # another fused chunk than lm.loss_chunk's default
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import emit, interleaved, ratios
from bench.on_policy_step import compare as on_policy_vs_trl
from bench.on_policy_step import trl_available
from stages.lm.models import LMSize, build_lm, train_tokenizer
from stages.losses.fused import Head, fused_top_k
from stages.losses.logits import forward_kl
from stages.tasks.reasoning import ReasoningTask

ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = int(os.environ.get("BENCH_THREADS", "1"))
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
TOKENS = 256 if QUICK else 2048
ROUNDS = 3 if QUICK else 5
VOCABS, HIDDEN, K = (32_000, 128_000), 256, 32
CHUNK = int(os.environ.get("BENCH_CHUNK", "0")) or None
"""Tokens per chunk of the fused loss (default: ``lm.loss_chunk``'s)."""


def _trl_loss():
    """TRL's ``generalized_jsd_loss`` (``GKDTrainer``'s static method), or None without ``trl``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return None
    return GKDTrainer.generalized_jsd_loss


def loss_steps(vocab: int, tokens: int, device: str, trl: bool = True) -> dict[str, Callable[[], None]]:
    """Forward + backward of the student side of one step, from hidden states [tokens, HIDDEN] and
    an output layer [vocab, HIDDEN], per variant. The teacher is a fixed random projection of its own
    hidden states: its top-k (k = K) are computed 64 rows at a time, so setting up never holds
    [tokens, vocab] at once; TRL's variant gets the full teacher logits it needs as its input."""
    from stages.lm.training import token_ce

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens + 1, HIDDEN, generator=g).to(device).requires_grad_()
    w = (torch.randn(vocab, HIDDEN, generator=g) * HIDDEN**-0.5).to(device).requires_grad_()
    t_h, t_w = torch.randn(tokens, HIDDEN, generator=g).to(device), (torch.randn(vocab, HIDDEN, generator=g) * 0.2).to(device)
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=g).to(device)
    top = [torch.log_softmax(t_h[s : s + 64] @ t_w.T, -1).topk(K, -1) for s in range(0, tokens, 64)]
    teacher = (torch.cat([t.indices for t in top])[None], torch.cat([t.values for t in top])[None])
    keep, chunk = torch.ones(1, tokens, dtype=torch.bool, device=device), CHUNK or _chunk()

    def run(loss_fn):
        def step():  # the gradients it makes count in its peak, and are gone before the next one
            loss_fn().backward()
            h.grad = w.grad = None

        return step

    steps = {
        "ce": run(lambda: token_ce(h @ w.T, labels)),
        "kd_fused": run(
            lambda: fused_top_k(
                h[:, :-1], Head(w), keep, labels[:, 1:], teacher, forward_kl, hyper={"temperature": 1.0}, alpha=0.5, chunk=chunk
            )
        ),  # fmt: skip
        "kd_unfused": run(lambda: _unfused_kd(h @ w.T, teacher, labels, token_ce)),
    }
    reference = _trl_loss() if trl else None
    if reference is not None:
        t_logits = t_h @ t_w.T
        steps["trl_generalized_jsd"] = run(lambda: reference((h[0, :-1] @ w.T)[None], t_logits[None], beta=0.5))
    return steps


def _unfused_kd(logits, teacher, labels, token_ce):
    """Today's unfused ``kd`` (``top_k_loss`` with ``lm.loss_chunk=0``): full logits, the sparse KD term and CE."""
    return 0.5 * forward_kl(logits[:, :-1], teacher, temperature=1.0) + 0.5 * token_ce(logits, labels)


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_step(variant: str, vocab: int, tokens: int) -> float:
    """MiB the step of ``variant`` adds at its peak (see the module docstring), after one warm-up step."""
    import gc

    torch.set_num_threads(TORCH_THREADS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = loss_steps(vocab, tokens, device, trl=variant == "trl_generalized_jsd")[variant]
    step()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status("VmRSS")
    step()
    return (_status("VmHWM") - before) / 1024


def _peak_in_fresh_process(variant: str, vocab: int, tokens: int) -> float:
    code = f"from bench.lm_distillation import peak_step; print(peak_step({variant!r}, {vocab}, {tokens}))"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(TORCH_THREADS)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def fused_kd(vocab: int, tokens: int = TOKENS) -> dict:
    """Time and peak-memory ratios of each variant of ``loss_steps`` to the plain CE step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = loss_steps(vocab, tokens, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timed = ratios(interleaved(steps, ROUNDS, sync), "ce")
    del steps
    if device == "cuda":
        peaks = {n: peak_step(n, vocab, tokens) for n in timed}
    else:
        peaks = {n: _peak_in_fresh_process(n, vocab, tokens) for n in timed}
    for n, r in timed.items():
        r.update(peak_mib=peaks[n], memory_ratio=peaks[n] / peaks["ce"])
    out = {"vocab": vocab, "tokens": tokens, "hidden": HIDDEN, "k": K, "device": device, "variants": timed}
    if "trl_generalized_jsd" in timed:
        out["kd_fused_over_trl"] = {"time": timed["kd_fused"]["seconds"] / timed["trl_generalized_jsd"]["seconds"],
                                    "memory": peaks["kd_fused"] / peaks["trl_generalized_jsd"]}  # fmt: skip
    return out


def _step_ratio(model, batch, topk) -> dict:
    """A tiny model's whole training step: kd as ``top_k_loss`` runs it (fused and unfused) and plain CE."""
    from stages.config import DistillConfig, LMConfig
    from stages.lm.methods import LM_METHODS
    from stages.lm.methods.token_level import top_k_loss
    from stages.lm.training import next_token_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch, "w": torch.ones(len(batch)),
         "t_ids": torch.nn.functional.pad(topk[0], (0, 0, 0, 1)), "t_logprobs": torch.nn.functional.pad(topk[1], (0, 0, 0, 1))}  # fmt: skip

    def step(loss_fn):
        def run():
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()

        return run

    kd = {c: top_k_loss(LM_METHODS["kd"], DistillConfig(alpha=0.5, temperature=1.0, lm=LMConfig(loss_chunk=c))) for c in (0, 256)}
    times = interleaved({"ce": step(lambda m, x: next_token_loss(m, x, chunk=0)), "kd_unfused": step(kd[0]),
                         "kd_fused": step(kd[256])}, ROUNDS * 2)  # fmt: skip
    return ratios(times, "ce")


def _sparse_vs_full(n: int = 256, vocab: int = 32_000, k: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(n, vocab, generator=g) * 3
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    sparse_teacher = (top.indices.int(), top.values.half())

    def full():
        student.grad = None
        forward_kl(student, teacher, temperature=1.0).backward()

    def sparse():
        student.grad = None
        forward_kl(student, sparse_teacher, temperature=1.0).backward()

    timed = ratios(interleaved({"sparse": sparse, "full": full}, ROUNDS), "sparse")["full"]
    full_bytes, sparse_bytes = n * vocab * 4, n * k * (4 + 2)  # a float32 distribution; int32 ids + float16 log-probs
    return {"vocab": vocab, "k": k, "rows": n, "time_ratio": timed["ratio"], "time_spread": timed["spread"],
            "teacher_memory_ratio": full_bytes / sparse_bytes}  # fmt: skip


def _generation(model, tok, prompts: list[str]) -> dict:
    from stages.lm.generation import sample

    def batched():
        return sample(model, tok, prompts, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=16, top_k=0, device="cpu")

    def loop():
        return [
            sample(model, tok, [p], samples=1, temperature=0.0, top_p=1.0, max_new_tokens=16, top_k=0, device="cpu")[0]
            for p in prompts
        ]

    tokens_b, tokens_l = sum(len(r["token_ids"]) for r in batched()), sum(len(r["token_ids"]) for r in loop())
    timed = ratios(interleaved({"batched": batched, "loop": loop}, 3), "batched")["loop"]
    speedup = timed["ratio"] * tokens_b / tokens_l  # tokens per second, batched over loop
    return {"batch": len(prompts), "ratio": speedup, "spread": [s * tokens_b / tokens_l for s in timed["spread"]]}


_MEASURE = (
    "import re, sys\n"
    "from distilcli.app import app\n"
    "code = 0\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code or 0\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print(code, hwm, file=sys.stderr)\n"
)
"""Runs one `distil` command and prints its exit code and peak resident set (KiB). ``VmHWM`` belongs
to the process image itself: ``getrusage``'s ``ru_maxrss`` would carry the bench process's own peak
through fork and exec."""


def _peak_rss(args: list[str]) -> float:
    """Peak RSS (MiB) of one `distil` command in its own process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    code, hwm = proc.stderr.strip().splitlines()[-1].split()
    if code != "0":
        raise RuntimeError(f"distil {' '.join(args)} exited with {code}: {proc.stderr[-2000:]}")
    return int(hwm) / 1024


def _teacher_data_costs(model, tok) -> tuple[int, dict]:
    """(bytes per stored token at k = 32, peak RSS of distill kd on 1x and 10x the teacher rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model.save_pretrained(d / "teacher")
        tok.save_pretrained(d / "teacher")
        distil = [sys.executable, "-m", "distilcli"]
        rss = {}
        for scale, sizes in (("1x", "[1000,20,20]"), ("10x", "[10000,20,20]")):
            subprocess.run([*distil, "generate-teacher-data", "--teacher", str(d / "teacher"), "--data", "chain_sum",
                            "--out", str(d / f"td{scale}"), "--set", f"data.sizes={sizes}", "--set", "top_k=32",
                            "--set", "max_new_tokens=16", "-q"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            if scale == "1x":
                manifest = json.loads((d / "td1x" / ".manifest.json").read_text())
            rss[scale] = _peak_rss(["distill", "--method", "kd", "--data", str(d / f"td{scale}"), "--out", str(d / f"s{scale}"),
                                    "--set", "epochs=1", "--set", "lm.hidden=64", "-q"])  # fmt: skip
    return manifest["bytes_per_token"], rss


def main() -> int:
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    fused = {f"vocab_{v // 1000}k": fused_kd(v) for v in VOCABS}
    texts = [r["prompt"] + " " + r["answer"] for r in ReasoningTask("chain_sum", sizes=(300, 10, 10)).table().to_pylist()]
    tok = train_tokenizer(texts, vocab_size=1000)
    model = build_lm("llama", LMSize(hidden=128, layers=2, heads=4, context=128), tok).eval()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = torch.tensor([x[:24] for x in ids if len(x) >= 24][:16])
    with torch.no_grad():
        top = F.log_softmax(model(input_ids=batch).logits[:, :-1], -1).topk(32, -1)
    step = _step_ratio(model.train(), batch, (top.indices, top.values))
    sparse = _sparse_vs_full()
    gen = _generation(model.eval(), tok, [t.split("Answer:")[0] + "Answer:" for t in texts[:16]])
    result = {
        "threads": TORCH_THREADS, "rounds": ROUNDS, "quick": QUICK, "trl": _trl_version(), "chunk": CHUNK or _chunk(),
        "fused_kd": fused, "kd_step_over_ce_step": step, "sparse_over_full": sparse, "batched_over_loop_tokens_per_s": gen,
    }  # fmt: skip
    if trl_available():
        result["on_policy_vs_trl"] = {f"new_tokens_{n}": on_policy_vs_trl(n, ROUNDS * 4) for n in (6, 32)}
    if not QUICK:  # 10x teacher data takes minutes to generate
        bytes_per_token, rss = _teacher_data_costs(model, tok)
        result.update(bytes_per_token_k32=bytes_per_token, peak_rss_mib=rss, rss_10x_over_1x=rss["10x"] / rss["1x"])
        (ROOT / "bench" / "results" / "lm_distillation.json").write_text(json.dumps(result, indent=2) + "\n")
    emit("lm_distillation", **result)
    return 0


def _chunk() -> int:
    from stages.config import LMConfig

    return LMConfig.loss_chunk


def _trl_version() -> str:
    try:
        import trl
    except ImportError:
        return "not installed (pip install -e '.[bench]'): the TRL comparison is left out"
    return trl.__version__
