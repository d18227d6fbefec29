"""`distil generate-teacher-data`: the router. A generator teacher (a diffusers folder)
makes diffusion teacher data; otherwise the data's modality decides:
``stages.<classifier|lm|diffusion>.teacher_data.run``."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from stages.config import DataConfig, GenerateTeacherDataConfig, check_modality
from stages.modality import DIFFUSION, as_spec, check_models, of_data, of_model


def run(cfg: GenerateTeacherDataConfig, teacher: Path | list[Path], data: str | Path, out: Path, *, data_cfg: DataConfig,
        device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    teachers = [as_spec(t) for t in (teacher if isinstance(teacher, (list, tuple)) else [teacher])]
    modality = DIFFUSION if any(of_model(t) == DIFFUSION for t in teachers) else of_data(data, data_cfg)
    check_modality(cfg, modality)
    check_models(modality, teacher=teachers)
    impl = import_module(f"stages.{modality}.teacher_data")
    teacher = teachers if isinstance(teacher, (list, tuple)) else teachers[0]
    return impl.run(cfg, teacher, data, out, data_cfg=data_cfg, device=device, progress=progress)
