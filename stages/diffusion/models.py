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
    is given) is added to the time embedding, as diffusers' U-Net adds ``class_embedding``. With
    ``class_embed_type="timestep"`` (as diffusers' U-Net names it) ``class_labels`` is a second,
    real-valued time embedded like the first (a flow map's target time)."""

    @register_to_config
    def __init__(self, sample_shape: tuple[int, ...] = (2,), hidden: int = 128, layers: int = 3, time_dim: int = 64,
                 num_classes: int = 0, class_embed_type: str | None = None):  # fmt: skip
        super().__init__()
        dim = math.prod(sample_shape)
        mlp = lambda: nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))  # noqa: E731
        self.time_mlp = mlp()
        if class_embed_type not in (None, "timestep"):
            raise DistilError(f"MLPDenoiser's class_embed_type must be None or 'timestep', got {class_embed_type!r}")
        self.second_time = mlp() if class_embed_type == "timestep" else None
        self.class_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes and self.second_time is None else None
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
        embed = lambda v: get_timestep_embedding(v, self.config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)  # noqa: E731
        temb = self.time_mlp(embed(t))
        if self.second_time is not None:
            if class_labels is None:
                raise DistilError("this network takes two times (a flow map): pass the second as class_labels")
            temb = temb + self.second_time(embed(torch.as_tensor(class_labels, device=sample.device).expand(b)))
        elif self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.config.num_classes, device=sample.device, dtype=torch.long)
            temb = temb + self.class_embedding(class_labels.to(sample.device))
        h = self.inp(sample.reshape(b, -1))
        for block in self.blocks:
            h = h + block(h + temb)
        out = self.out(h).reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class TimestepExperts(ModelMixin, ConfigMixin):
    """Denoisers of one architecture chosen per row by timestep: with ``splits`` s_1 > s_2 > ...,
    expert 0 serves t > s_1, expert i serves s_{i+1} < t <= s_i and the last t <= s_last. Two
    experts are DCM's semantic (high noise: layout and class) and detail (low noise: texture)
    experts (Lv et al. 2025, "Dual-Expert Consistency Model"); K are Phased DMD's one expert per
    phase of the SNR range (Fan et al. 2025). Saved as one diffusers model holding all of them
    (``expert_class`` / ``expert_config`` rebuild them), called like any one."""

    @register_to_config
    def __init__(self, expert_class: str = "MLPDenoiser", expert_config: dict | None = None, splits: list | None = None):
        super().__init__()
        if expert_class not in ("MLPDenoiser", "UNet2DModel"):
            raise DistilError(f"a timestep expert must be an MLPDenoiser or a UNet2DModel, got {expert_class}")
        splits = [int(v) for v in (splits or [])]
        if not splits or any(a <= b for a, b in zip(splits, splits[1:], strict=False)):
            raise DistilError(f"timestep experts need strictly decreasing splits, got {splits}")
        cls = MLPDenoiser if expert_class == "MLPDenoiser" else UNet2DModel
        config = {k: v for k, v in (expert_config or {}).items() if not k.startswith("_")}
        self.experts = nn.ModuleList(cls.from_config(config) for _ in range(len(splits) + 1))

    @classmethod
    def of(cls, expert: ModelMixin, splits: list[int]) -> TimestepExperts:
        """Every expert started from ``expert``'s weights (the teacher, as consistency students start)."""
        experts = cls(type(expert).__name__, {k: v for k, v in expert.config.items() if not k.startswith("_")}, list(splits))
        for e in experts.experts:
            e.load_state_dict(expert.state_dict())
        return experts.to(next(expert.parameters()).device)

    def owner(self, t: torch.Tensor) -> torch.Tensor:
        """The expert index of each timestep [B]."""
        return (t.reshape(-1, 1) <= torch.tensor(self.config.splits, device=t.device)).sum(1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):  # fmt: skip
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        owner = self.owner(t)
        out = torch.empty_like(sample)
        for i, expert in enumerate(self.experts):
            rows = owner == i
            if rows.any():
                out[rows] = expert(sample[rows], t[rows]).sample
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


def build_denoiser(cfg: DiffusionConfig, sample_shape: list[int], seed: int, classes: int = 0,
                   two_times: bool = False) -> ModelMixin:  # fmt: skip
    """A fresh network for samples of ``sample_shape`` ([2] points or [C, H, W] images); with
    ``classes`` > 0, conditioned on a class label (``classes`` + 1 embeddings, the last the null class);
    with ``two_times``, on a second time passed as ``class_labels`` (``class_embed_type="timestep"``)."""
    arch = cfg.arch if cfg.arch != "auto" else ("unet" if len(sample_shape) == 3 else "mlp")
    torch.manual_seed(seed)
    if arch == "mlp":
        if cfg.width < 1 or cfg.depth < 0 or cfg.time_dim < 2 or cfg.time_dim % 2:
            raise DistilError("diffusion.width must be >= 1, depth >= 0 and time_dim an even number >= 2")
        return MLPDenoiser(sample_shape=tuple(sample_shape), hidden=cfg.width, layers=cfg.depth, time_dim=cfg.time_dim,
                           num_classes=classes, class_embed_type="timestep" if two_times else None)  # fmt: skip
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
        num_class_embeds=classes + 1 if classes else None, class_embed_type="timestep" if two_times else None,
    )  # fmt: skip


def classes_of(model: ModelMixin) -> int:
    """The classes a denoiser is conditioned on (0: unconditional); its null class has this index."""
    if isinstance(model, TimestepExperts):
        return 0
    if isinstance(model, ClassExperts):
        return int(model.config.num_classes)
    if isinstance(model, MLPDenoiser):
        return 0 if model.config.get("class_embed_type") else int(model.config.get("num_classes", 0) or 0)
    embeds = model.config.get("num_class_embeds")
    return int(embeds) - 1 if embeds else 0


def sample_shape_of(model: ModelMixin) -> list[int]:
    if isinstance(model, TimestepExperts):
        return sample_shape_of(model.experts[0])
    if isinstance(model, ClassExperts):
        return sample_shape_of(model.experts[0])
    if isinstance(model, MLPDenoiser):
        return list(model.config.sample_shape)
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return [c.in_channels, size, size]
