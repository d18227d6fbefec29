"""`distil evaluate`: the router. Generator folders are evaluated on their own (sample
quality per step count); otherwise the data's modality decides:
``stages.<classifier|lm|diffusion>.evaluate.run``."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from rich.console import Console

from stages.config import DataConfig, EvaluateConfig, check_modality
from stages.errors import DistilError
from stages.modality import DIFFUSION, check_models, of_data, of_model


def run(cfg: EvaluateConfig, models: list[Path], data: str | Path, out: Path, *, data_cfg: DataConfig,
        cascades: list[Path] = (), device: str = "auto", console: Console | None = None) -> Path:  # fmt: skip
    if not models and not cascades:
        raise DistilError("nothing to evaluate: pass at least one --model or --cascade")
    generators = [of_model(p) == DIFFUSION for p in models]
    if any(generators) and not all(generators):
        raise DistilError("evaluate generators (diffusers folders) on their own: no classifiers or cascades in the same run")
    modality = DIFFUSION if any(generators) else of_data(data, data_cfg)
    check_modality(cfg, modality)
    check_models(modality, model=list(models))
    impl = import_module(f"stages.{modality}.evaluate")
    return impl.run(cfg, models, data, out, data_cfg=data_cfg, cascades=cascades, device=device, console=console)
