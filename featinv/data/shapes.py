"""The procedural ``shapes`` dataset: coloured shapes on textured backgrounds, with object masks.

Six classes (circle, square, triangle, cross, ring, star) at a random position, scale, rotation
and colour, over a two-colour gradient with a striped texture. Deterministic from a seed; drawn
with torch on a supersampled grid (anti-aliased), so no files are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from featinv.errors import FeatInvError, require_seed
from featinv.limits import LIMITS

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
SUPERSAMPLE = 4


@dataclass
class ShapesBatch:
    """Images (N, 3, S, S) in [0, 1], labels (N,), masks (N, 1, S, S) in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def _inside(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether shape-frame points (u, v), each (N, H, W), lie inside each sample's shape."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    tri = (v > -0.5) & (v < 1.0 - 1.732 * u.abs() * 1.0 + 0.0) & (v < 1.0)
    inside = torch.stack(
        [
            r < 1.0,
            torch.maximum(u.abs(), v.abs()) < 0.8,
            tri & (v < 1.0 - 1.732 * u.abs()),
            ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0)),
            (r < 1.0) & (r > 0.55),
            r < 0.6 + 0.4 * torch.cos(5.0 * theta),
        ]
    )
    return inside.gather(0, label.view(1, -1, 1, 1).expand(1, *u.shape))[0]


# Every seed of the shapes data, named once: each draws images no other use sees.
TRAIN_SEED = 1  # the training pools of the shipped models (featinv train --preset shapes-demo)
DEMO_SEED = 20_261_126  # the demo's held-out images (featinv demo), the analyses' and the validation pictures
REAL_SEED = DEMO_SEED + 1  # the real images FID compares against in featinv evaluate
EXAMPLES_SEED = DEMO_SEED + 7  # the web app's example images
HELD_OUT_SEED = 20_261_201  # a trained classifier's accuracy (featinv train-classifier)
VALIDATION_SEED = 7  # where the defaults of guided and hybrid sampling were chosen (never DEMO_SEED's images)

MAX_SIZE = LIMITS["data_size"].high  # pixels: shapes images are procedural, larger only costs memory
MAX_POOL_BYTES = 8 << 30  # a pool is generated in memory before it is written


def generate_shapes(n: int, seed: int, size: int = 32, device: torch.device | str = "cpu") -> ShapesBatch:
    """``n`` shapes images of ``size`` pixels, deterministic from ``seed`` (parameters are drawn on
    the CPU; the pixels are computed on ``device``)."""
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=g)

    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    center = uniform(-0.45, 0.45, 2)
    scale = uniform(0.3, 0.55)
    angle = uniform(0.0, 2 * math.pi)
    shape_colour = uniform(0.0, 1.0, 3)
    bg_a, bg_b = uniform(0.0, 1.0, 3), uniform(0.0, 1.0, 3)
    # Keep the shape visible: push its colour away from the background's mean.
    bg_mean = (bg_a + bg_b) / 2
    shape_colour = torch.where(
        (shape_colour - bg_mean).abs().mean(1, keepdim=True) < 0.25, 1.0 - bg_mean, shape_colour
    ).clamp(0, 1)
    grad_angle, stripe_angle = uniform(0.0, 2 * math.pi), uniform(0.0, 2 * math.pi)
    stripe_freq, stripe_amp = uniform(3.0, 9.0), uniform(0.03, 0.12)

    params = (labels, center, scale, angle, shape_colour, bg_a, bg_b, grad_angle, stripe_angle, stripe_freq, stripe_amp)
    labels, center, scale, angle, shape_colour, bg_a, bg_b, grad_angle, stripe_angle, stripe_freq, stripe_amp = (
        p.to(device) for p in params
    )
    fine = size * SUPERSAMPLE
    axis = (torch.arange(fine, device=device) + 0.5) / fine * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = x.expand(n, fine, fine), y.expand(n, fine, fine)
    dx, dy = x - center[:, 0, None, None], y - center[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    s = scale[:, None, None]
    u, v = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s
    mask = F.avg_pool2d(_inside(labels, u, v).float()[:, None], SUPERSAMPLE)

    coarse = (torch.arange(size, device=device) + 0.5) / size * 2 - 1
    cy, cx = torch.meshgrid(coarse, coarse, indexing="ij")
    ramp = (torch.cos(grad_angle)[:, None, None] * cx + torch.sin(grad_angle)[:, None, None] * cy + 1.5) / 3
    stripes = torch.sin(
        stripe_freq[:, None, None]
        * math.pi
        * (torch.cos(stripe_angle)[:, None, None] * cx + torch.sin(stripe_angle)[:, None, None] * cy)
    )
    background = bg_a[:, :, None, None] * ramp[:, None] + bg_b[:, :, None, None] * (1 - ramp[:, None])
    background = background + stripe_amp[:, None, None, None] * stripes[:, None]
    images = mask * shape_colour[:, :, None, None] + (1 - mask) * background
    return ShapesBatch(images.clamp(0, 1).cpu(), labels.cpu(), mask.cpu())


def shapes_pool(
    n: int, seed: int, size: int = 32, device: torch.device | str = "cpu", chunk: int = 2048
) -> ShapesBatch:
    """A training pool of ``n`` images, made in chunks (chunk i seeded ``seed * 100003 + i``)."""
    parts = [generate_shapes(min(chunk, n - i), seed * 100_003 + i, size, device=device) for i in range(0, n, chunk)]
    return ShapesBatch(*(torch.cat([getattr(p, k) for p in parts]) for k in ("images", "labels", "masks")))


def write_shapes(out: str | Path, n: int, seed: int, size: int = 32) -> None:
    """Write the pool ``shapes_pool(n, seed, size)`` in ImageNet layout: ``images/<class>/NNNNN.png``
    and the masks as ``masks/<class>/NNNNN.png`` (grey levels = mask coverage)."""
    if n < 1 or not 8 <= size <= MAX_SIZE:
        raise FeatInvError(f"need --n >= 1 and --size in [8, {MAX_SIZE}], got n={n}, size={size}")
    if n * size * size * 3 * 4 > MAX_POOL_BYTES:
        raise FeatInvError(
            f"--n {n} images of --size {size} px would take {n * size * size * 12 / 2**30:.1f} GiB in memory; "
            f"at most {MAX_POOL_BYTES / 2**30:.0f} GiB (fewer or smaller images)"
        )
    require_seed("--seed", seed)
    from featinv.images import save_image

    out = Path(out)
    pool = shapes_pool(n, seed, size)
    for name in CLASSES:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc="writing shapes", unit="image", leave=False):
        name = CLASSES[int(pool.labels[i])]
        save_image(pool.images[i], out / "images" / name / f"{i:05d}.png")
        grey = (pool.masks[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(grey, mode="L").save(out / "masks" / name / f"{i:05d}.png")
