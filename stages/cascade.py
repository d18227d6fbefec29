"""`distil cascade`: the router. Classifier cascades (confidence, augmented views) or LM
cascades (in-context distillation, self-consistency, costs in tokens):
``stages.<classifier|lm>.cascade.run``. Generators have no answers to defer on."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from stages.config import CascadeConfig, DataConfig, check_modality
from stages.modality import DIFFUSION, LM, as_spec, check_models, is_url, of_data, of_model, refuse


def run(cfg: CascadeConfig, student: Path, teacher: Path, data: str | Path, out: Path, *, data_cfg: DataConfig,
        policy_file: Path | None = None, device: str = "auto", models: list[Path] | tuple = (),
        progress: bool = True) -> Path:  # fmt: skip
    teacher = as_spec(teacher)
    modality = LM if of_model(student) == LM or is_url(teacher) else of_data(data, data_cfg)
    if DIFFUSION in (modality, of_model(student), of_model(teacher)):
        raise refuse("cascade", DIFFUSION, "a generator's samples have no answer to agree on; evaluate it with `distil evaluate`")
    check_modality(cfg, modality)
    check_models(modality, student=student, teacher=teacher, model=list(models))
    impl = import_module(f"stages.{modality}.cascade")
    return impl.run(cfg, student, teacher, data, out, data_cfg=data_cfg, policy_file=policy_file, device=device,
                    models=models, progress=progress)  # fmt: skip
