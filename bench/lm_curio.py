"""``curio`` against ``sft`` on the same gold answers, over seeds, in one process (issue 20: curio
keeps higher entropy and pass@n than sft at equal accuracy).

The task is the default pipeline's ``chain_sum`` with params.yaml's ``data`` and ``lm_student``
(the same size, steps and learning rate for both). Per seed and model: greedy test accuracy,
``pass@8`` and ``maj@8`` of 8 samples at temperature 1 (``distil evaluate``), and the mean
next-token entropy over the test answers' tokens with the gold answer fed in.

    python -m bench lm_curio            # 3 seeds
    BENCH_SEEDS=1 python -m bench lm_curio
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from rich.console import Console

from bench.harness import cached, emit, paired, workdir
from stages import distill
from stages import evaluate as evaluate_stage
from stages.config import DataConfig, DistillConfig, EvaluateConfig, load_section

ROOT = Path(__file__).resolve().parents[1]
TASK, SAMPLES = "chain_sum", 8


def _entropy(model_dir: Path, data: DataConfig) -> float:
    """Mean next-token entropy (nats) over the gold answer tokens of the test prompts."""
    from stages.lm.models import load_lm
    from stages.lm.training import IGNORE, collate, encode
    from stages.tasks import prompts_in_splits

    model, tok = load_lm(model_dir, "cpu")
    rows, _ = prompts_in_splits(TASK, data, ["test"])
    total, count = 0.0, 0
    for lo in range(0, len(rows), 64):
        b = collate([encode(tok, r["prompt"], r["answer"], 96) for r in rows[lo : lo + 64]], tok.pad_token_id)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float(), -1)
        keep = b["labels"][:, 1:] != IGNORE
        total += float(-(lp.exp() * lp).sum(-1)[keep].sum())
        count += int(keep.sum())
    return total / count


def main() -> int:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = range(int(os.environ.get("BENCH_SEEDS", "3")))
    data = load_section(DataConfig, params, "data")
    ev = replace(load_section(EvaluateConfig, params, "lm_evaluate"), samples=SAMPLES, temperature=1.0)
    t0 = time.perf_counter()
    out: dict[str, dict[str, list[float]]] = {}
    with workdir() as d:
        for seed in seeds:
            models = {}
            for method in ("sft", "curio"):
                cfg = replace(load_section(DistillConfig, params, "lm_student"), method=method, seed=seed)
                path = d / f"s{seed}" / method
                cached(path, cfg, lambda cfg=cfg, path=path: distill.run(cfg, TASK, path, data_cfg=data, progress=False))
                models[method] = path
            res = evaluate_stage.run(ev, list(models.values()), TASK, d / f"s{seed}" / "ev", data_cfg=data,
                                     console=Console(file=io.StringIO()))  # fmt: skip
            metrics = json.loads((res / "metrics.json").read_text())
            for method, path in models.items():
                m = metrics[path.name]
                row = {"accuracy": m["accuracy"], f"pass@{SAMPLES}": m[f"pass@{SAMPLES}"], f"maj@{SAMPLES}": m[f"maj@{SAMPLES}"],
                       "entropy": _entropy(path, data)}  # fmt: skip
                for k, v in row.items():
                    out.setdefault(method, {}).setdefault(k, []).append(v)
    mean = {m: {k: statistics.fmean(v) for k, v in cols.items()} for m, cols in out.items()}
    claims = {f"curio_vs_sft_{k}": {"curio": mean["curio"][k], "sft": mean["sft"][k], **paired(out["curio"][k], out["sft"][k])}
              for k in out["sft"]}  # fmt: skip
    lines = [f"| model (mean over {len(seeds)} seeds) | accuracy | pass@{SAMPLES} | maj@{SAMPLES} | entropy (nats) |", "|---|---|---|---|---|"]
    for m, v in mean.items():
        lines.append(f"| {m} | {v['accuracy']:.3f} | {v[f'pass@{SAMPLES}']:.3f} | {v[f'maj@{SAMPLES}']:.3f} | {v['entropy']:.3f} |")
    results = ROOT / "bench" / "results"
    (results / "lm_curio.md").write_text("\n".join(lines) + "\n")
    summary = {"seeds": len(seeds), "task": TASK, "per_seed": out, "mean": mean, **claims, "seconds": time.perf_counter() - t0}
    (results / "lm_curio.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit("lm_curio", **summary)
    return 0
