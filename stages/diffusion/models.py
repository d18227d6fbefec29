"""Denoising networks: a small MLP for 2-D points and a diffusers ``UNet2DModel`` for images.

Both are called ``model(x_t, t).sample`` with integer timesteps ``t`` in ``[0, T)``, and
both are diffusers models (``ModelMixin`` + ``ConfigMixin``), so ``save_pretrained`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``from_pretrained`` reads
them back: ``MLPDenoiser.from_pretrained(dir, subfolder="denoiser")``,
``UNet2DModel.from_pretrained(dir, subfolder="unet")``.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from stages.config import DiffusionConfig
from stages.errors import DistilError


class MLPDenoiser(ModelMixin, ConfigMixin):
    """A residual MLP over flattened samples, conditioned on a sinusoidal embedding of the
    timestep (Vaswani et al. 2017's positional encoding, as DDPM's U-Net embeds time) fed
    through a 2-layer MLP and added to every block's input. With ``num_classes`` > 0 a learnt
    embedding of the class label (index ``num_classes`` is the null class, used when no label
    is given) is added to the time embedding, as diffusers' U-Net adds ``class_embedding``."""

    @register_to_config
    def __init__(self, sample_shape: tuple[int, ...] = (2,), hidden: int = 128, layers: int = 3, time_dim: int = 64,
                 num_classes: int = 0):  # fmt: skip
        super().__init__()
        dim = math.prod(sample_shape)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):  # fmt: skip
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.ndim == 0 else t
        temb = self.time_mlp(get_timestep_embedding(t, self.config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0))
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.config.num_classes, device=sample.device, dtype=torch.long)
            temb = temb + self.class_embedding(class_labels.to(sample.device))
        h = self.inp(sample.reshape(b, -1))
        for block in self.blocks:
            h = h + block(h + temb)
        out = self.out(h).reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class TimestepExperts(ModelMixin, ConfigMixin):
    """Two denoisers of one architecture chosen per row by timestep: the semantic expert for
    t > ``split`` (high noise: layout and class), the detail expert for t <= ``split`` (low noise:
    texture) (Lv et al. 2025, "Dual-Expert Consistency Model"). Saved as one diffusers model
    holding both (``expert_class`` / ``expert_config`` rebuild them), called like either."""

    @register_to_config
    def __init__(self, expert_class: str = "MLPDenoiser", expert_config: dict | None = None, split: int = 0):
        super().__init__()
        if expert_class not in ("MLPDenoiser", "UNet2DModel"):
            raise DistilError(f"a timestep expert must be an MLPDenoiser or a UNet2DModel, got {expert_class}")
        cls = MLPDenoiser if expert_class == "MLPDenoiser" else UNet2DModel
        config = {k: v for k, v in (expert_config or {}).items() if not k.startswith("_")}
        self.semantic, self.detail = cls.from_config(config), cls.from_config(config)

    @classmethod
    def of(cls, expert: ModelMixin, split: int) -> TimestepExperts:
        """Both experts started from ``expert``'s weights (the teacher, as consistency students start)."""
        experts = cls(type(expert).__name__, {k: v for k, v in expert.config.items() if not k.startswith("_")}, split)
        experts.semantic.load_state_dict(expert.state_dict())
        experts.detail.load_state_dict(expert.state_dict())
        return experts.to(next(expert.parameters()).device)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):  # fmt: skip
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        high = t > self.config.split
        out = torch.empty_like(sample)
        for mask, expert in ((high, self.semantic), (~high, self.detail)):
            if mask.any():
                out[mask] = expert(sample[mask], t[mask]).sample
        return UNet2DOutput(sample=out) if return_dict else (out,)


class ClassExperts(ModelMixin, ConfigMixin):
    """Several class-conditional denoisers, each serving a group of the classes (``groups``: the
    classes of expert i); a row goes to the expert of its class label, a row without one (the
    null class) to the first. The routing is part of the saved model (Song et al. 2024,
    "Multi-student Diffusion Distillation": each student a subset of the conditions)."""

    @register_to_config
    def __init__(self, expert_class: str = "MLPDenoiser", expert_configs: list | None = None, groups: list | None = None,
                 num_classes: int = 0):  # fmt: skip
        super().__init__()
        if expert_class not in ("MLPDenoiser", "UNet2DModel"):
            raise DistilError(f"a class expert must be an MLPDenoiser or a UNet2DModel, got {expert_class}")
        cls = MLPDenoiser if expert_class == "MLPDenoiser" else UNet2DModel
        self.experts = nn.ModuleList(cls.from_config(dict(c)) for c in (expert_configs or []))

    @classmethod
    def of(cls, experts: list[ModelMixin], groups: list[list[int]], classes: int) -> ClassExperts:
        configs = [{k: v for k, v in e.config.items() if not k.startswith("_")} for e in experts]
        out = cls(type(experts[0]).__name__, configs, [list(map(int, g)) for g in groups], classes)
        for mine, theirs in zip(out.experts, experts, strict=True):
            mine.load_state_dict(theirs.state_dict())
        return out.to(next(experts[0].parameters()).device)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):  # fmt: skip
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(b) if t.ndim == 0 else t
        null = self.config.num_classes
        c = torch.full((b,), null, dtype=torch.long, device=sample.device) if class_labels is None else class_labels.to(sample.device)
        owner = torch.zeros(b, dtype=torch.long, device=sample.device)
        for i, group in enumerate(self.config.groups):
            owner[torch.isin(c, torch.tensor(group, device=c.device))] = i
        out = torch.empty_like(sample)
        for i, expert in enumerate(self.experts):
            rows = owner == i
            if rows.any():
                out[rows] = expert(sample[rows], t[rows], class_labels=c[rows]).sample
        return UNet2DOutput(sample=out) if return_dict else (out,)


def build_denoiser(cfg: DiffusionConfig, sample_shape: list[int], seed: int, classes: int = 0) -> ModelMixin:
    """A fresh network for samples of ``sample_shape`` ([2] points or [C, H, W] images); with
    ``classes`` > 0, conditioned on a class label (``classes`` + 1 embeddings, the last the null class)."""
    arch = cfg.arch if cfg.arch != "auto" else ("unet" if len(sample_shape) == 3 else "mlp")
    torch.manual_seed(seed)
    if arch == "mlp":
        if cfg.width < 1 or cfg.depth < 0 or cfg.time_dim < 2 or cfg.time_dim % 2:
            raise DistilError("diffusion.width must be >= 1, depth >= 0 and time_dim an even number >= 2")
        return MLPDenoiser(sample_shape=tuple(sample_shape), hidden=cfg.width, layers=cfg.depth, time_dim=cfg.time_dim,
                           num_classes=classes)  # fmt: skip
    if arch != "unet":
        raise DistilError(f"unknown diffusion.arch '{cfg.arch}'; use auto, mlp or unet")
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise DistilError(f"diffusion.arch unet needs square images [C, H, W]; the data's samples are {sample_shape}")
    levels = len(cfg.channels)
    if levels < 1 or any(c % cfg.norm_groups for c in cfg.channels):
        raise DistilError(f"diffusion.channels {cfg.channels} must be non-empty multiples of norm_groups ({cfg.norm_groups})")
    if sample_shape[1] % 2 ** (levels - 1):
        raise DistilError(
            f"a {sample_shape[1]}x{sample_shape[1]} image cannot be halved {levels - 1} times; use fewer channels levels"
        )
    return UNet2DModel(
        sample_size=sample_shape[1], in_channels=sample_shape[0], out_channels=sample_shape[0],
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups,
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
        num_class_embeds=classes + 1 if classes else None,
    )  # fmt: skip


def classes_of(model: ModelMixin) -> int:
    """The classes a denoiser is conditioned on (0: unconditional); its null class has this index."""
    if isinstance(model, TimestepExperts):
        return 0
    if isinstance(model, ClassExperts):
        return int(model.config.num_classes)
    if isinstance(model, MLPDenoiser):
        return int(model.config.get("num_classes", 0) or 0)
    embeds = model.config.get("num_class_embeds")
    return int(embeds) - 1 if embeds else 0


def sample_shape_of(model: ModelMixin) -> list[int]:
    if isinstance(model, TimestepExperts):
        return sample_shape_of(model.semantic)
    if isinstance(model, ClassExperts):
        return sample_shape_of(model.experts[0])
    if isinstance(model, MLPDenoiser):
        return list(model.config.sample_shape)
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return [c.in_channels, size, size]
