"""`distil distill`: the router. Trains a student (or a teacher) of the data's modality
with ``stages.<classifier|lm|diffusion>.distill.run``."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from stages.config import DataConfig, DistillConfig, check_modality
from stages.errors import DistilError
from stages.modality import CLASSIFIER, DIFFUSION, NAMES, as_spec, check_models, of_data, of_method
from stages.tasks import GENERATOR_DATA


def run(cfg: DistillConfig, data: str | Path, out: Path, *, data_cfg: DataConfig, teachers: list[Path] | tuple = (),
        device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    modality, owners = of_data(data, data_cfg), of_method(cfg.method)
    if owners == (DIFFUSION,) and modality != DIFFUSION:
        raise DistilError(
            f"method '{cfg.method}' trains a generator: --data must be generator data ({', '.join(GENERATOR_DATA)} "
            f"or diffusion teacher data), got '{data}'"
        )
    if modality == CLASSIFIER and owners and CLASSIFIER not in owners:  # the LM and generator routes name their own
        raise DistilError(
            f"method '{cfg.method}' is a {' and '.join(NAMES[o] for o in owners)} method, but '{data}' is classifier data; "
            "choose a classifier method (`distil distill --help` lists them)"
        )
    check_modality(cfg, modality)
    teachers = [as_spec(t) for t in teachers]
    check_models(modality, teacher=teachers)
    impl = import_module(f"stages.{modality}.distill")  # diffusers loads only for generators
    return impl.run(cfg, data, out, data_cfg=data_cfg, teachers=teachers, device=device, progress=progress)
