"""PNG pictures of generated samples, drawn with Pillow (no display, no matplotlib).

- ``write_image_grid``: one row per model (or model x steps), one column per sample.
  Size: width = label_width + cols * (cell + pad) + pad, height = rows * (cell + pad) + pad,
  with cell = H * scale (``grid_size`` computes it).
- ``write_scatter_grid``: one panel per (row, column), e.g. model x steps, with the real
  data in light grey underneath the samples; all panels share the axes (fitted to the
  real data), so panels compare at a glance.

Images are [N, 1, H, W] or [N, H, W] in ``value_range`` (default [-1, 1]); values
outside are clipped for display only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import DistilError

_BG, _INK, _REAL, _SAMPLE = (255, 255, 255), (0, 0, 0), (200, 200, 200), (31, 119, 180)


def _save_png(img: Any, path: Path) -> None:
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _images(x: Any) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:  # [N, H*W] square images
        side = int(round(a.shape[1] ** 0.5))
        if side * side == a.shape[1]:
            a = a.reshape(len(a), side, side)
    if a.ndim != 3:
        raise DistilError(f"image grid: expected grey images [N, 1, H, W] or [N, H, W], got shape {a.shape}")
    return a


def grid_size(
    rows: int, cols: int, height: int, width: int, *, scale: int = 4, pad: int = 1, label_width: int = 0
) -> tuple[int, int]:
    """(width, height) in pixels of ``write_image_grid``'s PNG."""
    return label_width + cols * (width * scale + pad) + pad, rows * (height * scale + pad) + pad


def write_image_grid(
    path: Path,
    rows: list[Any],
    *,
    labels: list[str] | None = None,
    scale: int = 4,
    pad: int = 1,
    label_width: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[int, int]:
    """A PNG with one row of images per entry of ``rows`` (each [n_i, 1, H, W]); shorter
    rows leave blank cells. Returns its (width, height)."""
    from PIL import Image, ImageDraw

    if not rows:
        raise DistilError("image grid: no rows to draw")
    imgs = [_images(r) for r in rows]
    h, w = imgs[0].shape[1:]
    if any(r.shape[1:] != (h, w) for r in imgs):
        raise DistilError(f"image grid: all images must share one size; got {sorted({r.shape[1:] for r in imgs})}")
    cols = max(len(r) for r in imgs)
    if label_width is None:
        label_width = 8 + 6 * max((len(s) for s in labels), default=0) if labels else 0
    size = grid_size(len(imgs), cols, h, w, scale=scale, pad=pad, label_width=label_width)
    canvas = Image.new("RGB", size, _BG)
    lo, hi = value_range
    cell_h, cell_w = h * scale + pad, w * scale + pad
    for i, r in enumerate(imgs):
        grey = np.clip((r - lo) / (hi - lo), 0, 1)
        for j, im in enumerate(grey):
            tile = Image.fromarray(np.uint8(np.round(im * 255))).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile.convert("RGB"), (label_width + pad + j * cell_w, pad + i * cell_h))
    if labels:
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(labels):
            draw.text((2, pad + i * cell_h + max(0, (h * scale - 10) // 2)), text, fill=_INK)
    _save_png(canvas, path)
    return size


def write_scatter_grid(
    path: Path,
    panels: list[list[Any]],
    real: Any,
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    panel: int = 220,
    max_points: int = 4000,
) -> tuple[int, int]:
    """A PNG of 2-D sample panels ``panels[row][col]`` (each [N, 2], or None for an empty
    panel) over the real data [M, 2]. Returns its (width, height)."""
    from PIL import Image, ImageDraw

    from stages.diffusion.metrics.distances import as_points, subsample

    ref = subsample(as_points(real, "real data"), max_points)
    lo, hi = np.quantile(ref, 0.002, axis=0), np.quantile(ref, 0.998, axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 * 1.25  # square axes, a margin around the data
    top, left = (16 if col_labels else 0), (8 + 6 * max(len(s) for s in row_labels) if row_labels else 0)
    n_rows, n_cols = len(panels), max((len(r) for r in panels), default=0)
    if n_rows == 0 or n_cols == 0:
        raise DistilError("scatter grid: no panels to draw")
    size = (left + n_cols * (panel + 4) + 4, top + n_rows * (panel + 4) + 4)
    pixels = np.full((size[1], size[0], 3), 255, dtype=np.uint8)

    def dots(p: np.ndarray, x0: int, y0: int, colour: tuple[int, int, int]) -> None:
        u = (p - centre) / (2 * half) + 0.5
        px = np.floor(x0 + u[:, 0] * (panel - 1)).astype(np.int64)
        py = np.floor(y0 + (1 - u[:, 1]) * (panel - 1)).astype(np.int64)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2x2 dots
            qx, qy = px + dx, py + dy
            keep = (qx >= x0) & (qx < x0 + panel) & (qy >= y0) & (qy < y0 + panel)
            pixels[qy[keep], qx[keep]] = colour

    for i, row in enumerate(panels):
        for j, pts in enumerate(row):
            x0, y0 = left + 4 + j * (panel + 4), top + 4 + i * (panel + 4)
            pixels[y0 - 1, x0 - 1 : x0 + panel + 1] = pixels[y0 + panel, x0 - 1 : x0 + panel + 1] = _REAL  # frame
            pixels[y0 - 1 : y0 + panel + 1, x0 - 1] = pixels[y0 - 1 : y0 + panel + 1, x0 + panel] = _REAL
            dots(ref, x0, y0, _REAL)
            if pts is not None:
                p = np.asarray(pts.detach().cpu().numpy() if hasattr(pts, "detach") else pts, dtype=np.float64).reshape(
                    len(pts), -1
                )
                dots(subsample(p[np.isfinite(p).all(1)], max_points, seed=1), x0, y0, _SAMPLE)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(row_labels or []):
        draw.text((2, top + 4 + i * (panel + 4) + panel // 2 - 5), text, fill=_INK)
    for j, text in enumerate(col_labels or []):
        draw.text((left + 4 + j * (panel + 4) + 2, 2), text, fill=_INK)
    _save_png(canvas, path)
    return size
