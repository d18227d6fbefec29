"""Small built-in classifier networks, saved as ``config.json`` + ``model.safetensors``.

The config records the architecture, input shape and class names, so a model directory
is self-describing and loads with ``load_classifier(dir)`` (or by hand: build the network
from the config and ``safetensors.torch.load_file``). A network of tabular features may
start with a ``Standardize`` layer (``"standardize": true`` in the config): the z-score
statistics of its train split are buffers in ``model.safetensors``, so every command that
loads the model (teacher data, evaluate, cascade, a live ``--teacher``) feeds it raw
features and it scales them itself, exactly as in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.artifacts import file_hash, load_tensors, save_tensors, write_json
from stages.classifier.scaling import Standardize
from stages.errors import DistilError
from stages.tasks.augment import augment

ARCHS = ("mlp", "cnn")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class Reshape(nn.Module):
    """Flat rows -> images of ``shape`` (a no-op view for inputs that already have it)."""

    def __init__(self, shape: list[int]):
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)


def augment_scaled(
    x: torch.Tensor, input_shape: list[int], strength: str, g: torch.Generator, scaler: Standardize | None
) -> torch.Tensor:
    """Augment raw rows in the space the network sees: with a scaler, z-score, augment,
    then undo the z-score (strong augmentation drops a feature to its train mean, not to a
    raw 0 that standardisation would turn into an outlier)."""
    if scaler is None or strength == "none":
        return augment(x, input_shape, strength, g)
    mean, std = scaler.mean.to(x.device), scaler.std.to(x.device)  # x may sit on another device than the model
    z = augment((x - mean) / std, input_shape, strength, g)
    return z * std + mean


class Classifier(nn.Module):
    """A trunk and a linear head with ``experts`` groups of logits.

    ``forward`` returns the mean of the experts' logits (one expert: plain logits);
    ``expert_logits`` returns all of them, ``[N, E, C]``. An optional ``aux_head`` serves
    methods with an auxiliary label space (sla-sd's joint class x rotation labels). An
    optional ``scaler`` standardises the raw inputs before the trunk."""

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        num_classes: int,
        dropout: float,
        experts: int = 1,
        aux_classes: int = 0,
        scaler: Standardize | None = None,
    ):
        super().__init__()
        self.num_classes, self.experts, self.feature_dim = num_classes, experts, feature_dim
        self.scaler = scaler
        self.trunk = trunk
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes * experts)
        self.aux_head = nn.Linear(feature_dim, aux_classes) if aux_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.scaler(x) if self.scaler is not None else x)

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x))).view(-1, self.experts, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert_logits(x).mean(dim=1)

    def aux_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux_head(self.drop(self.features(x)))


def mlp_trunk(in_dim: int, width: int, depth: int) -> tuple[nn.Module, int]:
    """``depth`` hidden layers of ``width`` units with GELU over flattened rows."""
    layers: list[nn.Module] = [nn.Flatten(1)]
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    return nn.Sequential(*layers), d


def cnn_trunk(input_shape: list[int], width: int, depth: int) -> tuple[nn.Module, int]:
    """``depth`` conv blocks (3x3 conv, BN, GELU; width doubling, 2x2 max-pool between
    blocks while the image is large enough) then global average pooling."""
    if len(input_shape) != 3:
        raise DistilError(f"cnn needs image inputs (C x H x W), got input shape {input_shape}; use model.arch=mlp")
    blocks: list[nn.Module] = [Reshape(input_shape)]
    c = input_shape[0]
    for i in range(depth):
        out = width * (2**i)
        blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.GELU()]
        if i < depth - 1 and min(input_shape[1:]) // (2 ** (i + 1)) >= 2:
            blocks.append(nn.MaxPool2d(2))
        c = out
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*blocks), c


def build_classifier(
    arch: str,
    width: int,
    depth: int,
    dropout: float,
    input_shape: list[int],
    num_classes: int,
    experts: int = 1,
    aux_classes: int = 0,
    standardize: bool = False,
) -> Classifier:
    """The network; ``standardize`` adds a ``Standardize`` layer (statistics to be fitted or
    loaded) for flat tabular inputs."""
    if arch not in ARCHS:
        raise DistilError(f"unknown model.arch '{arch}'; choose one of {', '.join(ARCHS)}")
    if width < 1 or depth < (0 if arch == "mlp" else 1):
        raise DistilError(f"model.width ({width}) and model.depth ({depth}) must be positive")
    if experts < 1:
        raise DistilError(f"model.experts must be >= 1, got {experts}")
    if standardize and len(input_shape) != 1:
        raise DistilError(f"feature standardisation needs flat feature rows, got input shape {input_shape}")
    scaler = Standardize(input_shape[0]) if standardize else None
    trunk, dim = mlp_trunk(math.prod(input_shape), width, depth) if arch == "mlp" else cnn_trunk(input_shape, width, depth)
    return Classifier(trunk, dim, num_classes, dropout, experts, aux_classes, scaler)


def build_from_config(config: dict[str, Any]) -> Classifier:
    if config.get("multitask"):  # multi-gate's students (stages.classifier.multitask)
        from stages.classifier.multitask import build_multitask

        return build_multitask(config["multitask"], config["input_shape"], config["num_classes"], config.get("standardize", False))
    return build_classifier(
        config["arch"], config["width"], config["depth"], config.get("dropout", 0.0), config["input_shape"],
        config["num_classes"], config.get("experts", 1), config.get("aux_classes", 0), config.get("standardize", False),
    )  # fmt: skip


def save_classifier(directory: Path, model: nn.Module, config: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS, model.state_dict(), metadata={"format": "pt"})
    write_json(directory / CONFIG, config)


def load_classifier(directory: Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    directory = Path(directory)
    if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
        raise DistilError(
            f"{directory} is not a distil model (needs {CONFIG} and {WEIGHTS}); train one with `distil distill --method ce`"
        )
    try:
        config = json.loads((directory / CONFIG).read_text())
        model = build_from_config(config)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise DistilError(f"{directory / CONFIG} is not a classifier config ({exc}); retrain the model") from None
    state = load_tensors(directory / WEIGHTS)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DistilError(f"{directory / WEIGHTS} does not match its config ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), config


def check_compatible(config: dict[str, Any], num_classes: int, input_shape: list[int], what: str, data: Any) -> None:
    """A model serves a data set when the feature counts agree (a flat table of 64 pixel
    columns feeds an 8x8 image model) and the data's labels are classes the model knows."""
    if math.prod(config["input_shape"]) != math.prod(input_shape):
        raise DistilError(
            f"{what} expects inputs of shape {config['input_shape']} but {data} has {input_shape}; use data with matching features"
        )
    if num_classes > config["num_classes"]:
        raise DistilError(
            f"{data} has labels up to {num_classes - 1} but {what} knows only {config['num_classes']} classes; "
            "retrain it on data with these labels"
        )


def identity(directory: Path) -> dict[str, str]:
    directory = Path(directory)
    return {"path": str(directory), "sha256": file_hash(directory / WEIGHTS)}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: list[int]) -> int:
    """Forward FLOPs for one row (2 x multiply-accumulates of Linear and Conv2d layers)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += 2 * k * out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)
