"""Input augmentations for classifier rows, selectable as weak or strong.

Images (input shape C x H x W) get one-pixel shifts, Gaussian noise and, when strong, a
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
    """Weak: pixel noise and a 1-pixel shift of half the images. Strong: a 1-pixel shift of
    every image, more noise and a cutout square of a quarter of the side. On 8x8 digits one
    pixel is an eighth of the image, so shifts stay at one pixel."""
    n, _, h, w = img.shape
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    if not strong:
        shifts = shifts * (torch.rand(n, 1, generator=g) < 0.5)
    pad = torch.nn.functional.pad(img, (1, 1, 1, 1))
    out = torch.empty_like(img)
    for i in range(n):  # per-image shifts; N is a mini-batch, so the loop is cheap
        dy, dx = int(shifts[i, 0]) + 1, int(shifts[i, 1]) + 1
        out[i] = pad[i, :, dy : dy + h, dx : dx + w]
    out = out + torch.randn(out.shape, generator=g).to(out.device) * (0.1 if strong else 0.05)
    if strong:
        size = max(1, h // 4)
        ys = torch.randint(0, h - size + 1, (n,), generator=g)
        xs = torch.randint(0, w - size + 1, (n,), generator=g)
        for i in range(n):
            out[i, :, ys[i] : ys[i] + size, xs[i] : xs[i] + size] = 0
    return out
