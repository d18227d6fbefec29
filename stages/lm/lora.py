"""LoRA students through peft (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022): ``wrap`` puts a trainable low-rank adapter on a pretrained student whose
own weights stay frozen, ``save`` writes it in PEFT's format, ``load`` reads such a folder back
as one plain transformers model.

A LoRA student's folder (``distil distill`` with ``lora.r > 0``)::

    out/adapter_config.json         the adapter, exactly as ``PeftModel.save_pretrained`` writes it:
    out/adapter_model.safetensors   ``PeftModel.from_pretrained(base, out)``, ``AutoPeftModelForCausalLM``
    out/tokenizer files             the student's tokenizer (the base's own)
    out/merged/                     with ``lora.merge``: base + adapter merged into plain weights,
                                    ``AutoModelForCausalLM.from_pretrained(out / "merged")``

No ``config.json`` sits beside the adapter: transformers would then take the folder for a
full model with an embedded adapter, and plain ``AutoModelForCausalLM.from_pretrained(out)``
(which, with peft installed, loads base + adapter) would fail. ``base_model_name_or_path`` in
``adapter_config.json`` is the student as it was given (``--student`` / ``lm.init``): a model
directory, a shipped name (``smollm2-135m``) or a hub name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.artifacts.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter, quiet_peft  # noqa: F401  (re-exported names)
from stages.errors import DistilError

MERGED = "merged"
"""Subfolder of a LoRA student holding the merged full weights (``lora.merge: true``)."""


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def wrap(model, cfg, base: str | Path):
    """``model`` as a ``peft.PeftModel`` with a LoRA adapter of ``cfg`` (a ``LoraConfig``) on
    ``cfg.target_modules`` (none: peft's default for the family, e.g. q_proj and v_proj for
    Llama; ``[all-linear]``: every linear layer but the output head). Only the adapter
    trains. ``base`` is what ``adapter_config.json`` names as the base model."""
    import peft

    targets = _targets(model, list(cfg.target_modules))
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             task_type="CAUSAL_LM")  # fmt: skip
    try:
        with quiet_peft():
            wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:  # no default targets for this family, or a module type LoRA cannot adapt
        first = str(exc).strip().splitlines()[0][:160]
        raise DistilError(f"peft cannot put LoRA on this model ({first}); set lora.target_modules to some of: "
                          f"{', '.join(adaptable(model)[:8])}") from None  # fmt: skip
    wrapped.peft_config["default"].base_model_name_or_path = str(base)
    return wrapped


def adaptable(model) -> list[str]:
    """The distinct short names of the layers LoRA can adapt (linear, embedding and GPT-2's
    Conv1D), in model order: what ``lora.target_modules`` may name."""
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if name and isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D)) and short not in names:
            names.append(short)
    return names


def _targets(model, wanted: list[str]) -> list[str] | str | None:
    """``lora.target_modules`` as peft takes it, each name checked against the model's
    modules the way peft matches them (the full name, or its last dotted parts)."""
    if not wanted:
        return None
    if wanted == ["all-linear"]:
        return "all-linear"
    names = [n for n, _ in model.named_modules() if n]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if missing:
        raise DistilError(f"lora.target_modules {', '.join(missing)}: no such module in this model; "
                          f"its adaptable layers include {', '.join(adaptable(model)[:8])} (or use [all-linear])")  # fmt: skip
    return wanted


def parameter_counts(model) -> dict[str, int]:
    """Total and trainable parameters (for a LoRA student: base + adapter, and the adapter)."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def save(model, tokenizer, out: Path, *, merge: bool) -> None:
    """Write the adapter of the ``PeftModel`` ``model`` and the tokenizer to ``out``; with
    ``merge`` also the merged weights to ``out / MERGED``. Merging folds the adapter into
    ``model``'s base weights in place: ``model`` is not for further use after it."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / MERGED)
        tokenizer.save_pretrained(out / MERGED)


def load(path: Path, device, dtype: torch.dtype | None, load_lm, load_tokenizer, _seen: tuple[Path, ...] = ()):
    """(model, tokenizer) of a LoRA student's folder: its merged weights when present, else
    its base (``base_model_name_or_path``, itself possibly a LoRA student) with the adapter
    merged in, so callers get one plain transformers model either way. ``load_lm`` and
    ``load_tokenizer`` are ``stages.lm.models``' loaders (passed in: that module calls this one)."""
    path = Path(path)
    if (path / MERGED / "config.json").is_file():
        return load_lm(path / MERGED, device, dtype)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise DistilError(f"{path} holds a LoRA adapter config but no {ADAPTER_WEIGHTS} (distil reads safetensors only, "
                          "never *.bin pickles); point at a folder written by `distil distill` with lora.r > 0")  # fmt: skip
    base = base_of(path)
    if Path(base).resolve() in (path.resolve(), *_seen):
        raise DistilError(f"the LoRA adapter {path} names itself (or a folder that names it) as its base model {base}; "
                          f"set base_model_name_or_path in {path / ADAPTER_CONFIG} to the model it was trained on")  # fmt: skip
    try:
        if is_adapter(base):
            model, _ = load(Path(base), "cpu", dtype, load_lm, load_tokenizer, (*_seen, path.resolve()))
        else:
            model, _ = load_lm(base, "cpu", dtype)
    except DistilError as exc:
        raise DistilError(f"{path} is a LoRA adapter on {base}, which does not load: {exc}") from None
    tokenizer = _tokenizer(path, base, load_tokenizer)
    return merge_adapter(model, path, base).to(device).eval(), tokenizer


def base_of(path: Path) -> str:
    """The base model an adapter folder names."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        raise DistilError(f"{Path(path) / ADAPTER_CONFIG} is not a readable JSON object; rerun the distill that wrote it") from None
    if not base:
        raise DistilError(f"{Path(path) / ADAPTER_CONFIG} names no base_model_name_or_path; set it to the model the adapter "
                          "was trained on (a directory, a shipped name or a hub name)")  # fmt: skip
    return str(base)


def _tokenizer(path: Path, base: str, load_tokenizer):
    """The tokenizer saved with the adapter, else the base's."""
    try:
        return load_tokenizer(path)
    except DistilError:
        return load_tokenizer(base)
