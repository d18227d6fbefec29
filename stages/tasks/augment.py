"""Input augmentations for classifier rows, selectable as weak or strong.

Images (input shape C x H x W) get small shifts, Gaussian noise and, when strong, a
cutout square; flat feature vectors get feature-scaled noise and, when strong, random
feature dropout.
"""

from __future__ import annotations

import torch

from stages.errors import DistilError

STRENGTHS = ("none", "weak", "strong")


def augment(x: torch.Tensor, input_shape: list[int], strength: str, generator: torch.Generator) -> torch.Tensor:
    """x: [N, D] flattened rows -> [N, D] augmented copy."""
    if strength not in STRENGTHS:
        raise DistilError(f"unknown augmentation '{strength}'; choose one of {', '.join(STRENGTHS)}")
    if strength == "none":
        return x
    strong = strength == "strong"
    if len(input_shape) == 3:
        return _augment_images(x.view(-1, *input_shape), strong, generator).reshape(x.shape)
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    out = x + noise * (0.15 if strong else 0.05) * x.std(dim=0, keepdim=True).clamp_min(1e-3)
    if strong:
        keep = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) > 0.1
        out = out * keep
    return out


def _augment_images(img: torch.Tensor, strong: bool, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = img.shape
    max_shift = 2 if strong else 1
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
    pad = torch.nn.functional.pad(img, (max_shift,) * 4)
    out = torch.empty_like(img)
    for i in range(n):  # per-image shifts; N is a mini-batch, so the loop is cheap
        dy, dx = int(shifts[i, 0]) + max_shift, int(shifts[i, 1]) + max_shift
        out[i] = pad[i, :, dy : dy + h, dx : dx + w]
    out = out + torch.randn(out.shape, generator=g).to(out.device) * (0.1 if strong else 0.03)
    if strong:
        size = max(1, h // 3)
        ys = torch.randint(0, h - size + 1, (n,), generator=g)
        xs = torch.randint(0, w - size + 1, (n,), generator=g)
        for i in range(n):
            out[i, :, ys[i] : ys[i] + size, xs[i] : xs[i] + size] = 0
    return out
