"""`distil distill` for generators: the data is generator data (``moons``, ``digits-images``,
diffusion teacher data), the output a generator folder (``stages.diffusion.generator``).

``stages.diffusion.methods.DIFFUSION_METHODS`` is the explicit name -> method table.
Training checkpoints into ``<out>.partial/checkpoint`` (``stages.diffusion.training``), so
a killed run resumes; ``training.json`` holds the per-epoch history.
"""

from __future__ import annotations

from pathlib import Path

from stages.artifacts import Kind, Output, fingerprint
from stages.config import DataConfig, DistillConfig, to_dict
from stages.devices import resolve_device
from stages.diffusion.data import (
    GENERATOR_DATA,
    generator_identity,
    is_teacher_data,
    load_generator_data,
)
from stages.diffusion.generator import CONSISTENCY_SCHEDULERS, FLOW_SCHEDULERS, generator_hash, is_generator, save_generator
from stages.diffusion.methods import DIFFUSION_METHODS
from stages.errors import DistilError
from stages.modality import DIFFUSION, of_data
from stages.runlog import finish, logged


def run(
    cfg: DistillConfig,
    data: str | Path,
    out: Path,
    *,
    data_cfg: DataConfig,
    teachers: list[Path] | tuple = (),
    device: str = "auto",
    progress: bool = True,
) -> Path:
    if cfg.method not in DIFFUSION_METHODS:
        raise DistilError(
            f"method '{cfg.method}' does not train generators; on generator data use {', '.join(DIFFUSION_METHODS)}"
        )
    if of_data(data, data_cfg) != DIFFUSION:
        raise DistilError(
            f"method '{cfg.method}' trains a generator: --data must be generator data ({', '.join(GENERATOR_DATA)} "
            f"or diffusion teacher data), got '{data}'"
        )
    method = DIFFUSION_METHODS[cfg.method]
    if method.trajectories_only and not is_teacher_data(data):
        from stages.diffusion.methods.trajectory import IMAGE_FREE

        raise DistilError(f"{IMAGE_FREE}, got '{data}'")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.steps < 0:
        raise DistilError("epochs, batch_size and lr must be positive (and steps >= 0)")
    teachers = [Path(t) for t in teachers]
    if cfg.diffusion.classes and cfg.method != "denoise":
        raise DistilError(f"diffusion.classes trains a class-conditional teacher (--method denoise); {cfg.method} trains an "
                          "unconditional generator: set diffusion.classes=0")  # fmt: skip
    if not method.teacher and teachers:
        raise DistilError(f"method '{cfg.method}' trains from data alone; drop --teacher")
    if method.teacher and len(teachers) != 1:
        raise DistilError(f"method '{cfg.method}' needs exactly one diffusion teacher; pass --teacher DIR")
    for t in teachers:
        if not is_generator(t):
            raise DistilError(f"teacher {t} is not a generator folder (no model_index.json); train one with --method denoise")
    dev = resolve_device(device)
    gdata = load_generator_data(data, data_cfg)
    if len(gdata.splits.get("train", ())) == 0:
        raise DistilError(f"{data} has no train samples; check data.sizes or data.limit")
    params = {"distill": to_dict(cfg), "data": to_dict(data_cfg)}
    inputs = {"data": generator_identity(data), "teacher": generator_hash(teachers[0]) if teachers else ""}
    output = Output(out, fingerprint("distill", params, inputs))
    with output as work:
        with logged(work, progress) as (live, bar):
            model, scheduler, summary = method.train(cfg, gdata, teachers[0] if teachers else None, work, device=dev,
                                                     bar=bar, live=live)  # fmt: skip
        save_generator(work, model.cpu(), scheduler, guided=summary.get("guided"))
        summary = {"method": cfg.method, "params": sum(p.numel() for p in model.parameters()),
                   "train_rows": len(gdata.splits["train"]), **summary}  # fmt: skip
        name = type(scheduler).__name__
        kind = "consistency" if name in CONSISTENCY_SCHEDULERS else "flow-map" if name in FLOW_SCHEDULERS else "diffusion"
        finish(work, summary, kind=Kind.GENERATOR, params=params, inputs=inputs,
               extra={"data": gdata.describe(), "generator": {"kind": kind, "sample_shape": gdata.sample_shape,
                      "scheduler": type(scheduler).__name__}})  # fmt: skip
        return output.commit()
