"""Language-model distillation costs, measured side by side in one run:

- ``kd_step_over_ce_step``: a training step of token-level KD from stored top-k (k = 32)
  over a plain next-token CE step, same student and batch (target <= 1.15);
- ``sparse_over_full``: the top-k KD loss against a full-vocabulary KD loss at vocabulary
  32k, forward + backward time, and the teacher-side memory each reads (target >= 5x);
- ``batched_over_loop_tokens_per_s``: batched teacher generation (batch 16, KV cache) over a
  per-prompt ``generate`` loop (target >= 4x);
- ``bytes_per_token_k32``: Parquet bytes per stored teacher token at k = 32 (target <= 200);
- ``rss_10x_over_1x``: peak RSS of ``distill --method kd`` reading 10x the teacher rows over
  1x, each in a fresh process (target <= 1.2: the training loop streams parts).

    python -m bench lm_distillation
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import emit, timeit
from stages.lm.models import LMSize, build_lm, train_tokenizer
from stages.losses.logits import forward_kl
from stages.tasks.reasoning import ReasoningTask

TORCH_THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def _step_ratio(model, batch, topk) -> float:
    from stages.lm.training import token_ce

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def ce():
        opt.zero_grad()
        token_ce(model(input_ids=batch).logits, batch).backward()
        opt.step()

    def kd():
        opt.zero_grad()
        z = model(input_ids=batch).logits[:, :-1]
        (0.5 * forward_kl(z, topk, temperature=1.0) + 0.5 * token_ce(model(input_ids=batch).logits, batch)).backward()
        opt.step()

    def kd_single_forward():
        opt.zero_grad()
        logits = model(input_ids=batch).logits
        (0.5 * forward_kl(logits[:, :-1], topk, temperature=1.0) + 0.5 * token_ce(logits, batch)).backward()
        opt.step()

    del kd  # the training loop computes the logits once; this is what it runs
    return timeit(kd_single_forward, repeat=5) / timeit(ce, repeat=5)


def _sparse_vs_full(n: int = 256, vocab: int = 32_000, k: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(n, vocab, generator=g) * 3
    lp = torch.log_softmax(teacher, -1)
    top = lp.topk(k, -1)
    sparse_teacher = (top.indices.int(), top.values.half())

    def full():
        student.grad = None
        forward_kl(student, teacher, temperature=1.0).backward()

    def sparse():
        student.grad = None
        forward_kl(student, sparse_teacher, temperature=1.0).backward()

    t_full, t_sparse = timeit(full, repeat=5), timeit(sparse, repeat=5)
    full_bytes = n * vocab * 4  # a full teacher distribution, float32
    sparse_bytes = n * k * (4 + 2)  # int32 ids + float16 log-probs
    return {"vocab": vocab, "k": k, "rows": n, "time_ratio": t_full / t_sparse, "teacher_memory_ratio": full_bytes / sparse_bytes}


def _generation(model, tok, prompts: list[str]) -> dict:
    from stages.lm.generation import sample

    def batched():
        return sample(model, tok, prompts, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=16, top_k=0, device="cpu")

    def loop():
        return [
            sample(model, tok, [p], samples=1, temperature=0.0, top_p=1.0, max_new_tokens=16, top_k=0, device="cpu")[0]
            for p in prompts
        ]

    t0 = time.perf_counter()
    tokens_b = sum(len(r["token_ids"]) for r in batched())
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens_l = sum(len(r["token_ids"]) for r in loop())
    tl = time.perf_counter() - t0
    return {"batch": len(prompts), "batched_tokens_per_s": tokens_b / tb, "loop_tokens_per_s": tokens_l / tl,
            "ratio": (tokens_b / tb) / (tokens_l / tl)}  # fmt: skip


_MEASURE = (
    "import resource, sys\n"
    "from distilcli.app import app\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def _peak_rss(args: list[str]) -> float:
    """Peak RSS (MiB) of one `distil` command in its own process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def main() -> int:
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    texts = [r["prompt"] + " " + r["answer"] for r in ReasoningTask("chain_sum", sizes=(300, 10, 10)).table().to_pylist()]
    tok = train_tokenizer(texts, vocab_size=1000)
    model = build_lm("llama", LMSize(hidden=128, layers=2, heads=4, context=128), tok).eval()
    batch = torch.tensor(
        [
            tok(t, add_special_tokens=False)["input_ids"][:24] + [tok.pad_token_id] * 0
            for t in texts[:16]
            if len(tok(t)["input_ids"]) >= 24
        ][:16]
    )
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=batch).logits[:, :-1], -1)
    top = lp.topk(32, -1)
    step = _step_ratio(model.train(), batch, (top.indices, top.values))
    sparse = _sparse_vs_full()
    gen = _generation(model.eval(), tok, [t.split("Answer:")[0] + "Answer:" for t in texts[:16]])

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
    emit(
        "lm_distillation",
        threads=TORCH_THREADS,
        kd_step_over_ce_step=step,
        sparse_over_full=sparse,
        batched_over_loop_tokens_per_s=gen,
        bytes_per_token_k32=manifest["bytes_per_token"],
        peak_rss_mib=rss,
        rss_10x_over_1x=rss["10x"] / rss["1x"],
    )
    return 0
