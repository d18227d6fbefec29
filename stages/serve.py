"""`distil serve`: the router. A language model (a student or a teacher), or a calibrated
cascade (the student with ``--teacher`` and ``--policy-file``), behind an
OpenAI-compatible API: ``stages.lm.serve.run``. Classifiers and generators have no text to
complete and are refused with one line."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from stages.config import ServeConfig
from stages.errors import DistilError
from stages.modality import CLASSIFIER, DIFFUSION, LM, as_spec, of_model, refuse

WHY = {
    CLASSIFIER: "a classifier has no text to complete; evaluate it with `distil evaluate` or cascade it with `distil cascade`",
    DIFFUSION: "a generator has no text to complete; sample it with `distil generate-teacher-data`",
}


def run(cfg: ServeConfig, model: Path, *, teacher: str | None = None, policy_file: Path | None = None, device: str = "auto") -> None:
    if (teacher is None) != (policy_file is None):
        raise DistilError("a served cascade needs both --teacher and --policy-file (policy.json of `distil cascade`); or pass neither")
    modality = of_model(model)
    if modality is None and _looks_like_a_path(model):
        what = "is a file, not a model directory" if Path(model).exists() else "does not exist"
        raise DistilError(f"model {model} {what}; pass a language model directory written by `distil distill`")
    if modality == CLASSIFIER and not (Path(model) / "config.json").is_file():
        raise DistilError(f"{model} holds no model (no config.json); pass a language model directory written by `distil distill`")
    if modality in WHY:
        raise refuse("serve", modality, WHY[modality])
    impl = import_module(f"stages.{LM}.serve")
    if policy_file is None:
        impl.run(cfg, model, device=device)
        return
    from stages.devices import resolve_device
    from stages.lm.serve.cascade import CascadeEngine

    engine = CascadeEngine(Path(policy_file), model, as_spec(teacher), resolve_device(device))
    impl.run(cfg, model, device=device, engine=engine, name=cfg.model_name or "cascade")


def _looks_like_a_path(model: Path) -> bool:
    """Not a directory, and no model name either (a shipped name, or a hub name org/name)."""
    text = str(model)
    return Path(model).exists() or Path(model).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
