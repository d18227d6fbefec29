"""The teacher-hacking probe (Tiapkin et al., "On Teacher Hacking in Language Model Distillation",
2025, section 3's setup): an oracle -> teacher -> student chain on a task whose true distribution
is known, the student trained on offline (a fixed set, reused for many epochs) or online (fresh
teacher samples every step) data, with the student-teacher (proxy) and student-oracle (golden)
divergences tracked over training (issue 20: teacher hacking appears with offline data and not
with online data).

- The oracle is a random tiny Llama (weights drawn wide, so its next-token distributions are
  structured, neither uniform nor one-hot): the true distribution, known exactly at every prefix.
- The teacher, a smaller Llama, is distilled from the oracle (token-level forward KL on oracle
  samples) for a fixed budget: a close but imperfect copy, as every real teacher is.
- The student, smaller again, is distilled from the teacher with token-level forward KL(p_T || p_S)
  on teacher samples: offline, ``OFFLINE_SET`` sequences fixed at the start; online, ``BATCH``
  fresh sequences (new prompts) every step. Same steps, batch and learning rate.
- Every ``EVERY`` steps: golden = mean token KL(p_O || p_S) on oracle samples of held-out prompts;
  proxy = mean token KL(p_T || p_S) on teacher samples, twice: of the held-out prompts, and of the
  data the student trains on (offline: the fixed set; online: one fixed batch of teacher samples,
  as new as any other), the quantity the training itself drives down.

Teacher hacking, as the paper defines it: the proxy keeps falling while the golden metric rises.
Flagged (per proxy) when the golden metric ends ``RISE`` (relative) above its minimum while the
proxy at the end is below its value at that minimum; the step of the minimum is where they part.

    python -m bench teacher_hacking          # 3 seeds, about 2 minutes
    BENCH_SEEDS=1 python -m bench teacher_hacking
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.harness import emit, paired
from stages.lm.models import LMSize, build_lm, draw_wide

ROOT = Path(__file__).resolve().parents[1]
V, PROMPT, LENGTH = 24, 2, 10
ORACLE, TEACHER, STUDENT = LMSize(hidden=48, layers=2, heads=4, context=16), LMSize(hidden=32, layers=2, heads=2, context=16), \
    LMSize(hidden=24, layers=2, heads=2, context=16)  # fmt: skip
TEACHER_STEPS, STEPS, BATCH, OFFLINE_SET, EVERY, LR, RISE = 300, 1500, 64, 64, 50, 0.01, 0.02


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 0

    def __len__(self):
        return V


@torch.no_grad()
def sample(model, prompts: torch.Tensor) -> torch.Tensor:
    """Ancestral samples of ``LENGTH`` tokens after each prompt [N, PROMPT] (no eos: fixed length)."""
    seqs = prompts
    for _ in range(LENGTH):
        logits = model(input_ids=seqs).logits[:, -1]
        seqs = torch.cat([seqs, torch.multinomial(torch.softmax(logits, -1), 1)], 1)
    return seqs


def token_kl(p_model, q_model, seqs: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Mean over the completion tokens of ``seqs`` of KL(p || q) between the two models' next-token
    distributions; gradients reach ``q_model`` when ``grad``."""
    with torch.no_grad():
        lp = torch.log_softmax(p_model(input_ids=seqs).logits[:, PROMPT - 1 : -1], -1)
    with torch.enable_grad() if grad else torch.no_grad():
        lq = torch.log_softmax(q_model(input_ids=seqs).logits[:, PROMPT - 1 : -1], -1)
        return (lp.exp() * (lp - lq)).sum(-1).mean()


def _prompts(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, V, (n, PROMPT), generator=g)


def distil(source, target, steps: int, g: torch.Generator, fixed: torch.Tensor | None = None, probe=None) -> list[dict]:
    """Train ``target`` toward ``source`` with token KL on ``source`` samples: from ``fixed`` (offline,
    shuffled each epoch) or fresh ones each step (online); ``probe(step)`` every ``EVERY`` steps."""
    opt = torch.optim.Adam(target.parameters(), lr=LR)
    curve, order, pos = [], None, 0
    for step in range(steps + 1):
        if probe is not None and step % EVERY == 0:
            curve.append({"step": step, **probe()})
        if step == steps:
            break
        if fixed is None:
            batch = sample(source, _prompts(BATCH, g))
        else:
            if order is None or pos + BATCH > len(fixed):
                order, pos = torch.randperm(len(fixed), generator=g), 0
            batch, pos = fixed[order[pos : pos + BATCH]], pos + BATCH
        opt.zero_grad()
        token_kl(source, target, batch, grad=True).backward()
        opt.step()
    return curve


def hacking(curve: list[dict], proxy: str = "proxy") -> dict:
    """Whether the golden metric rose while ``proxy`` kept falling, and where they parted."""
    best = min(range(len(curve)), key=lambda i: curve[i]["golden"])
    end = curve[-1]
    flagged = end["golden"] > curve[best]["golden"] * (1 + RISE) and end[proxy] < curve[best][proxy]
    return {"flagged": bool(flagged), "parted_at_step": curve[best]["step"] if flagged else None,
            "golden_min": curve[best]["golden"], "golden_end": end["golden"], "proxy_at_golden_min": curve[best][proxy],
            "proxy_end": end[proxy]}  # fmt: skip


def one_seed(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    oracle = draw_wide(build_lm("llama", ORACLE, _Vocab()), 0.25, seed).eval()
    torch.manual_seed(seed)
    teacher = build_lm("llama", TEACHER, _Vocab())
    distil(oracle, teacher, TEACHER_STEPS, g)
    teacher.eval()
    held = _prompts(512, g)
    on_teacher, on_oracle = sample(teacher, held), sample(oracle, held)
    offline = sample(teacher, _prompts(OFFLINE_SET, g))
    out = {"teacher_vs_oracle": float(token_kl(oracle, teacher, on_oracle))}
    for mode in ("offline", "online"):
        torch.manual_seed(seed + 1)
        student = build_lm("llama", STUDENT, _Vocab())

        seen = offline if mode == "offline" else sample(teacher, _prompts(OFFLINE_SET, g))

        def probe(student=student, seen=seen):
            return {"proxy": float(token_kl(teacher, student, on_teacher)), "proxy_train": float(token_kl(teacher, student, seen)),
                    "golden": float(token_kl(oracle, student, on_oracle))}  # fmt: skip

        curve = distil(teacher, student, STEPS, g, fixed=offline if mode == "offline" else None, probe=probe)
        out[mode] = {"curve": curve, **hacking(curve), "on_train_proxy": hacking(curve, "proxy_train")}
    return out


def main() -> int:
    torch.set_num_threads(1)
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    t0 = time.perf_counter()
    runs = [one_seed(s) for s in seeds]
    summary = {"seeds": len(seeds), "settings": {"vocab": V, "length": LENGTH, "steps": STEPS, "batch": BATCH,
                                                 "offline_set": OFFLINE_SET, "every": EVERY, "lr": LR, "rise": RISE}}  # fmt: skip
    for mode in ("offline", "online"):
        summary[mode] = {
            "flagged_seeds": sum(r[mode]["flagged"] for r in runs),
            "flagged_seeds_on_train_proxy": sum(r[mode]["on_train_proxy"]["flagged"] for r in runs),
            "parted_at_steps": [r[mode]["parted_at_step"] for r in runs],
            "proxy_end": [r[mode]["proxy_end"] for r in runs],
            "proxy_train_end": [r[mode]["curve"][-1]["proxy_train"] for r in runs],
            "golden_end_over_min": statistics.fmean(r[mode]["golden_end"] / r[mode]["golden_min"] for r in runs),
            "golden_end": [r[mode]["golden_end"] for r in runs],
        }
    summary["offline_minus_online_golden_end"] = paired(summary["offline"]["golden_end"], summary["online"]["golden_end"])
    summary["hacking_offline_not_online"] = summary["offline"]["flagged_seeds"] > 0 and summary["online"]["flagged_seeds"] == 0
    summary["hacking_offline_not_online_on_train_proxy"] = (summary["offline"]["flagged_seeds_on_train_proxy"] > 0
                                                            and summary["online"]["flagged_seeds_on_train_proxy"] == 0)  # fmt: skip
    summary["teacher_vs_oracle"] = [r["teacher_vs_oracle"] for r in runs]
    summary["seconds"] = time.perf_counter() - t0
    results = ROOT / "bench" / "results"
    (results / "teacher_hacking.json").write_text(json.dumps({**summary, "curves": [{m: r[m]["curve"] for m in ("offline", "online")}
                                                                                     for r in runs]}, indent=2) + "\n")  # fmt: skip
    _plot(runs, results / "teacher_hacking.png")
    emit("teacher_hacking", **summary)
    return 0


def _plot(runs: list[dict], path: Path) -> None:
    """Proxy and golden divergence over training, offline against online, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, mode in zip(axes, ("offline", "online"), strict=True):
        for i, r in enumerate(runs):
            steps = [c["step"] for c in r[mode]["curve"]]
            ax.plot(steps, [c["proxy"] for c in r[mode]["curve"]], color="tab:blue", alpha=0.7,
                    label="KL(teacher || student), held out" if i == 0 else None)  # fmt: skip
            ax.plot(steps, [c["proxy_train"] for c in r[mode]["curve"]], color="tab:blue", ls=":", alpha=0.7,
                    label="KL(teacher || student), training data" if i == 0 else None)  # fmt: skip
            ax.plot(steps, [c["golden"] for c in r[mode]["curve"]], color="tab:red", alpha=0.7, label="KL(oracle || student)" if i == 0 else None)
        ax.set_title(f"{mode} data")
        ax.set_xlabel("student step")
        ax.set_yscale("log")
    axes[0].set_ylabel("mean token KL (nats)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
