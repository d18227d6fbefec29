"""Where models run: `--device auto|cpu|cuda[:N]` resolved to a torch device, or a clear error."""

import torch

from stages.errors import DistilError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DistilError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DistilError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)
