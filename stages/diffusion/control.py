"""Control adapters of diffusion models (``distill --method control-lora``'s output): reading one
and merging it, unchanged, into another generator of the same architecture (``evaluate --set
control=DIR``). Kept apart from the training code so evaluation imports only this."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.artifacts.adapters import merge_adapter
from stages.errors import DistilError

ADAPTER, CONTROL = "control", "control.json"
"""The adapter's folder (PEFT's adapter_config.json + adapter_model.safetensors) and its description."""


def public_config(model: torch.nn.Module) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def read_control(path: str | Path) -> dict:
    """A control-lora folder's ``CONTROL`` (its class, base), or one clear error."""
    path = Path(path)
    if not (path / CONTROL).is_file() or not (path / ADAPTER / "adapter_config.json").is_file():
        raise DistilError(f"evaluate.control {path} is not a control-lora folder (no {CONTROL} and {ADAPTER}/); train one with "
                          "distill --method control-lora --teacher TEACHER")  # fmt: skip
    return json.loads((path / CONTROL).read_text())


def apply_control(model_dir: str | Path, control: str | Path, dest: Path) -> Path:
    """The generator at ``model_dir`` with ``control``'s adapter merged into it, unchanged (no
    training), saved at ``dest``. Its network must be the adapter's base architecture: a student
    that started from the teacher's weights (consistency-distill, multistep, scott, dmd, ...)."""
    from stages.diffusion.generator import load_generator, save_generator

    info = read_control(control)
    gen = load_generator(model_dir, "cpu", "controlled model")
    if type(gen.model).__name__ != info["network"] or public_config(gen.model) != info["base_config"]:
        raise DistilError(f"the adapter of {control} was trained on a {info['network']} of another shape than {model_dir}'s "
                          f"{type(gen.model).__name__}: control transfers between a teacher and students of its architecture")  # fmt: skip
    merged = merge_adapter(gen.model, Path(control) / ADAPTER, str(model_dir))
    save_generator(dest, merged, gen.scheduler)
    return dest
