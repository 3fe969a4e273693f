"""Batched image geometry on the training device: the augmentation warp, eval resize + centre crop, normalisation.

The data side hands the worker uint8 pixels (taken here as (B, 3, H, W)); everything here runs on whatever
device they are on (CPU or CUDA, the same code), one kernel per step for the whole batch instead of
per-sample CPU work.
Per-sample warp parameters are drawn from (seed, epoch, row id) by `draw_params`, so augmentation is
reproducible whatever the batching.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# One row of warp parameters: rotation (radians, counter-clockwise as torchvision's rotate), extent (half-width of the sampled source square, in units
# of the source's half-width: < 1 zooms in, > 1 zooms out), centre x, centre y (normalised source
# coordinates, [-1, 1]), flip x, flip y (0 or 1).
N_PARAMS = 6
# Train crops keep 80-100% of the area (docs/design.md#augmentation). The aspect ratio stays 1: a stretched
# round galaxy looks like an in-between or cigar one, and axis ratio is what separates those classes.
CROP_AREA = (0.8, 1.0)
SYMBOL_ZOOM = (0.85, 1.15)  # as the renderer's own jitter (data/symbols.py)
SYMBOL_SHIFT_SD, SYMBOL_SHIFT_MAX = 0.04, 0.08
SYMBOL_VARIANTS = 3  # line-width variants per symbol spec in the bank (data/symbol_bank.py)
# Above this ratio of source to output size the warp would alias (bilinear sampling, no low-pass):
# images are first area-downscaled to about PRE_RESIZE x the output size.
MAX_WARP_DOWNSCALE, PRE_RESIZE = 1.25, 1.12


def _uniforms(ids: Sequence[Any], seed: int, epoch: int) -> np.ndarray:
    """(B, 16) uniforms in [0, 1) per row, a function of (seed, epoch, id) only: one hash per row."""
    out = np.empty((len(ids), 16), np.float64)
    for i, row_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{epoch}:{row_id}".encode(), digest_size=64).digest()
        out[i] = np.frombuffer(digest, dtype="<u4") / 2.0**32
    return out


def draw_params(ids: Sequence[Any], seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Per-row image and symbol warps for one epoch: {"image": (B, 6), "symbol": (B, 6)} float32, "variant": (B,)."""
    u = _uniforms(ids, seed, epoch)
    n = len(ids)
    image = np.zeros((n, N_PARAMS), np.float32)
    image[:, 0] = (u[:, 0] * 2 - 1) * math.pi  # galaxies have no preferred orientation
    extent = np.sqrt(CROP_AREA[0] + u[:, 1] * (CROP_AREA[1] - CROP_AREA[0]))
    image[:, 1] = extent
    image[:, 2] = (u[:, 2] * 2 - 1) * (1 - extent)  # the crop stays inside the image
    image[:, 3] = (u[:, 3] * 2 - 1) * (1 - extent)
    image[:, 4] = u[:, 4] < 0.5
    image[:, 5] = u[:, 5] < 0.5
    symbol = np.zeros((n, N_PARAMS), np.float32)
    symbol[:, 0] = u[:, 6] * 2 * math.pi
    zoom = SYMBOL_ZOOM[0] + u[:, 7] * (SYMBOL_ZOOM[1] - SYMBOL_ZOOM[0])
    symbol[:, 1] = 1.0 / zoom  # drawn `zoom` times larger = sample a source square 1/zoom as wide
    # A small shift of the drawing (Box-Muller normal, clipped as the renderer clips it).
    radius = np.sqrt(-2 * np.log1p(-u[:, 8]))
    shift = np.clip(SYMBOL_SHIFT_SD * radius[:, None] * np.stack([np.cos(2 * math.pi * u[:, 9]),
                    np.sin(2 * math.pi * u[:, 9])], 1), -SYMBOL_SHIFT_MAX, SYMBOL_SHIFT_MAX)  # fmt: skip
    symbol[:, 2:4] = -shift / zoom[:, None]  # moving the drawing by +d = sampling the source at -d/zoom
    symbol[:, 4] = u[:, 10] < 0.5  # a mirrored spiral has the other chirality, equally real
    variant = np.minimum((u[:, 11] * SYMBOL_VARIANTS).astype(np.int64), SYMBOL_VARIANTS - 1)
    return {"image": image, "symbol": symbol, "variant": variant}


def affine(params: torch.Tensor) -> torch.Tensor:
    """(B, 6) warp parameters -> (B, 2, 3) affine_grid matrices (output coords -> source coords).

    Output (u, v) is flipped, scaled by the extent, moved to the centre, then rotated about the source
    centre: the same geometry as torchvision's rotate (counter-clockwise, about the centre) followed by a
    square resized crop and flips, in one sampling.
    """
    angle, extent, cx, cy, fx, fy = params.unbind(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = extent * (1 - 2 * fx)
    sy = extent * (1 - 2 * fy)
    # Counter-clockwise on screen as torchvision's rotate (y points down): source = R(-angle) applied.
    r = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    scale = torch.stack(
        [torch.stack([sx, torch.zeros_like(sx)], 1), torch.stack([torch.zeros_like(sy), sy], 1)], 1
    )
    linear = r @ scale
    centre = (r @ torch.stack([cx, cy], 1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([linear, centre.unsqueeze(-1)], dim=2)


def _area_downscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """Low-pass before sampling: a source much larger than the output is first resized to ~PRE_RESIZE x."""
    if x.shape[-1] <= MAX_WARP_DOWNSCALE * size:
        return x
    side = round(PRE_RESIZE * size)
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def warp(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float (B, 3, H, W) square sources -> float32 (B, 3, size, size) in [0, 255], one warp per row.

    Outside the source is black (torchvision's rotate fills with 0; the sky and the symbols' background are dark).
    """
    x = _area_downscale(images.float(), size)
    theta = affine(params.to(x.device, torch.float32))
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Eval geometry, as open_clip's image_transform(is_train=False): shortest side to `size` (bicubic,
    antialiased), centre crop. uint8 or float (B, 3, H, W) -> float32 (B, 3, size, size) in [0, 255]."""
    x = images.float()
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        # torchvision's Resize(int) truncates the long side: int(long * short_target / short)
        new = (size, int(w * scale)) if h <= w else (int(h * scale), size)
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size].clamp_(0, 255)


def normalise(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[0, 255] pixels -> (x / 255 - mean) / std, per channel, in the run's precision."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    return ((x - m) / s).to(dtype)
