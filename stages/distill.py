"""`distil distill`: train a classifier student (or a teacher, with ``--method ce``).

Methods (``METHODS``): ``ce`` trains on gold labels only; every other name is a
divergence from ``stages.losses.DIVERGENCES`` against the teacher logits stored by
``generate-teacher-data``, mixed with gold-label CE as ``alpha * D + (1 - alpha) * CE``
(Hinton et al. 2015). Rows carry the selection ``weight`` when the input is a selection.

The run keeps the best checkpoint on the dev split, logs per-epoch metrics with dvclive,
and checkpoints every epoch into ``<out>.partial/`` so a killed run resumes where it
stopped (same data, params and seed give the same result as an uninterrupted run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts import Output, fingerprint, list_column_to_numpy, load_state, save_state, write_json, write_manifest
from stages.config import DataConfig, DistillConfig, to_dict
from stages.errors import DistilError
from stages.losses import DIVERGENCES, cross_entropy
from stages.metrics import accuracy, nll, softmax
from stages.models import resolve_device
from stages.models.classifiers import (
    build_classifier,
    check_compatible,
    identity,
    load_classifier,
    param_count,
    predict_logits,
    save_classifier,
)
from stages.progress import progress_bar
from stages.tasks import Examples, load_examples, source_identity
from stages.tasks.augment import STRENGTHS, augment

METHODS: dict[str, str] = {
    "ce": "cross-entropy on gold labels (trains teachers and baselines; needs no teacher data)",
    "kd": "Hinton KD: T^2 KL(p_t || p_s) mixed with CE",
    "reverse-kl": "reverse KL(p_s || p_t), mode seeking",
    "jsd": "generalised Jensen-Shannon divergence with beta (GKD)",
    "skew-kl": "skew KL of DistiLLM (reverse_skew for the reverse variant)",
    "tvd": "total variation distance",
}


def _hyper(method: str, cfg: DistillConfig) -> dict[str, Any]:
    extra = {"jsd": {"beta": cfg.beta}, "skew-kl": {"skew": cfg.skew, "reverse": cfg.reverse_skew}}.get(method, {})
    return {"temperature": cfg.temperature, **extra}


def _tensors(ex: Examples, split: str, need_logits: bool) -> dict[str, torch.Tensor]:
    part = ex.split(split)
    out = {
        "x": torch.from_numpy(list_column_to_numpy(part.column("features"), f"{split} features")),
        "y": torch.from_numpy(part.column("label").to_numpy().astype(np.int64)),
    }
    if need_logits:
        logits = list_column_to_numpy(part.column("logits"), f"{split} teacher logits")
        if logits.shape[1] != ex.num_classes:
            raise DistilError(
                f"teacher logits have {logits.shape[1]} classes but the task has {ex.num_classes}; regenerate teacher data"
            )
        out["t"] = torch.from_numpy(logits)
    w = part.column("weight").to_numpy().astype(np.float32) if "weight" in part.schema.names else np.ones(len(part), np.float32)
    out["w"] = torch.from_numpy(w)
    return out


def run(
    cfg: DistillConfig,
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    teacher: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train and write the student to ``out``.

    With ``teacher`` (a model directory) the teacher runs live on every training batch,
    on the same augmented inputs the student sees: "function matching" (Beyer et al.,
    "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022,
    section 3). Without it, the stored ``logits`` column of the data is the teacher.
    """
    if cfg.method not in METHODS:
        raise DistilError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    if cfg.augment not in STRENGTHS:
        raise DistilError(f"unknown augment '{cfg.augment}'; choose one of {', '.join(STRENGTHS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DistilError("epochs, batch_size and lr must be positive")
    dev_ = resolve_device(device)
    ex = load_examples(data, data_cfg)
    live_teacher = None
    if teacher is not None:
        live_teacher, t_cfg = load_classifier(teacher, dev_)
        check_compatible(t_cfg, ex.num_classes, ex.input_shape, f"teacher {teacher}", data)
    need_logits = cfg.method != "ce" and live_teacher is None
    if need_logits and "logits" not in ex.table.schema.names:
        raise DistilError(
            f"method '{cfg.method}' needs teacher logits but {data} has none; run `distil generate-teacher-data` and pass its output"
        )
    train, dev = _tensors(ex, "train", need_logits), _tensors(ex, "dev", False)
    if len(train["y"]) == 0 or len(dev["y"]) == 0:
        raise DistilError(f"{data} needs rows in both the train and dev splits; check the split column or data.limit")
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = build_classifier(m.arch, m.width, m.depth, m.dropout, ex.input_shape, ex.num_classes).to(dev_)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": source_identity(data), "teacher": identity(teacher)["sha256"] if teacher else ""}
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        state = {"epoch": 0, "best_acc": -1.0, "best_nll": float("inf"), "best_epoch": -1, "history": [], "seconds": 0.0}
        ckpt = work / "checkpoint" / "state"
        if (work / "checkpoint" / "state.json").exists():
            saved = load_state(ckpt)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            state = saved["progress"]
            torch.set_rng_state(saved["rng"])  # dropout draws continue where they stopped
        (work / "checkpoint").mkdir(exist_ok=True)

        from dvclive import Live

        config = {
            "arch": m.arch, "width": m.width, "depth": m.depth, "dropout": m.dropout,
            "input_shape": ex.input_shape, "num_classes": ex.num_classes, "class_names": ex.class_names,
            "task": ex.name, "method": cfg.method,
        }  # fmt: skip
        hyper = _hyper(cfg.method, cfg)
        divergence = DIVERGENCES.get(cfg.method)
        n = len(train["y"])
        with (
            Live(dir=str(work / "dvclive"), save_dvc_exp=False, dvcyaml=None, resume=state["epoch"] > 0, report=None) as live,
            progress_bar(progress) as bar,
        ):
            task = bar.add_task(f"distill {cfg.method}", total=cfg.epochs, completed=state["epoch"], info="")
            for epoch in range(state["epoch"], cfg.epochs):
                t0 = time.perf_counter()
                model.train()
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                order = torch.randperm(n, generator=g)
                total = 0.0
                for i in range(0, n, cfg.batch_size):
                    idx = order[i : i + cfg.batch_size]
                    x = augment(train["x"][idx], ex.input_shape, cfg.augment, g).to(dev_)
                    y, w = train["y"][idx].to(dev_), train["w"][idx].to(dev_)
                    z = model(x)
                    loss = cross_entropy(z, y, weight=w)
                    if divergence is not None:
                        if live_teacher is not None:
                            with torch.no_grad():
                                t = live_teacher(x)
                        else:
                            t = train["t"][idx].to(dev_)
                        loss = cfg.alpha * divergence(z, t, weight=w, **hyper) + (1 - cfg.alpha) * loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                sched.step()
                probs = softmax(predict_logits(model.eval(), dev["x"]).numpy())
                dev_acc, dev_nll = accuracy(probs.argmax(1), dev["y"].numpy()), nll(probs, dev["y"].numpy())
                state["seconds"] += time.perf_counter() - t0
                row = {"epoch": epoch + 1, "train_loss": total / n, "dev_accuracy": dev_acc, "dev_nll": dev_nll}
                state["history"].append(row)
                for k in ("train_loss", "dev_accuracy", "dev_nll"):
                    live.log_metric(k, row[k])
                live.next_step()
                if dev_acc > state["best_acc"] or (dev_acc == state["best_acc"] and dev_nll < state["best_nll"]):
                    state.update(best_acc=dev_acc, best_nll=dev_nll, best_epoch=epoch + 1)
                    save_classifier(work, model, config)
                state["epoch"] = epoch + 1
                save_state(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "progress": state,
                                  "rng": torch.get_rng_state()})  # fmt: skip
                bar.update(task, advance=1, info=f"loss {row['train_loss']:.3f}  dev acc {dev_acc:.4f}")

        best, _ = load_classifier(work)
        summary = {
            "method": cfg.method,
            "best_epoch": state["best_epoch"],
            "dev_accuracy": state["best_acc"],
            "dev_nll": state["best_nll"],
            "train_seconds": state["seconds"],
            "params": param_count(best),
            "history": state["history"],
        }
        write_json(work / "training.json", summary)
        for f in (work / "checkpoint").iterdir():
            f.unlink()
        (work / "checkpoint").rmdir()
        write_manifest(
            work,
            kind="model",
            params=params,
            inputs=inputs,
            extra={"task": ex.meta()["task"], "training": {k: v for k, v in summary.items() if k != "history"}},
        )
        return output.commit()
