"""`distil select`: the router. Filters and weights classifier or LM teacher data
(``stages.<classifier|lm>.select.run``); ``--by uncertain`` picks LM prompts. Generator
data has nothing to select."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from stages.config import DataConfig, SelectConfig, check_modality
from stages.modality import DIFFUSION, LM, of_data, refuse


def run(cfg: SelectConfig, data, out: Path, *, student: Path | None = None, data_cfg: DataConfig | None = None,
        device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    modality = LM if cfg.by == "uncertain" else of_data(data, data_cfg)
    if modality == DIFFUSION:
        raise refuse("select", DIFFUSION, "generator samples carry no answers to filter; distil from them directly")
    check_modality(cfg, modality)
    impl = import_module(f"stages.{modality}.select")
    return impl.run(cfg, data, out, student=student, data_cfg=data_cfg, device=device, progress=progress)
