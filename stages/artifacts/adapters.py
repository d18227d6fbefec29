"""PEFT adapters on disk, for every modality: their file names, merging one into a base network
from its safetensors file alone, and the peft warnings a user can do nothing about.

A LoRA student of a language model (``stages.lm.lora``) and a diffusion control adapter
(``stages.diffusion.control``) are both PEFT folders: ``adapter_config.json`` +
``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, dir)`` loads too.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from stages.errors import DistilError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def quiet_peft():
    """Warnings the user can do nothing about: peft asks transformers 5 for the deprecated
    ``is_gradient_checkpointing``, and notes that a loaded adapter's base is named by its
    path in memory (an in-memory config that is merged away at once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path` was renamed.*", category=UserWarning)
        yield


def merge_adapter(model: torch.nn.Module, path: Path, base: str) -> torch.nn.Module:
    """``model`` with the adapter of ``path`` merged in. The weights are read here, from the
    safetensors file only (``PeftModel.from_pretrained`` would fall back to a *.bin pickle)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    from stages.artifacts import load_tensors

    config = PeftConfig.from_pretrained(str(path))  # adapter_config.json
    with quiet_peft(), torch.random.fork_rng():  # the adapter's random init, overwritten below, leaves the caller's RNG alone
        wrapped = get_peft_model(model, config)
    try:
        result = set_peft_model_state_dict(wrapped, load_tensors(Path(path) / ADAPTER_WEIGHTS))
    except RuntimeError as exc:  # shapes that do not fit the base
        first = str(exc).strip().splitlines()[-1][:160]
        raise DistilError(f"the LoRA adapter {path} does not fit its base model {base} ({first}); train it on that base") from None
    if result.unexpected_keys:
        raise DistilError(f"the LoRA adapter {path} has weights its base model {base} has no layer for "
                          f"({result.unexpected_keys[0]}, ...); train it on that base")  # fmt: skip
    return wrapped.merge_and_unload()
