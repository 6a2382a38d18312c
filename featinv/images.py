"""Reading and writing images: files <-> (B, 3, H, W) float tensors in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from featinv.errors import FeatInvError

MAX_PIXELS = 64_000_000


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One image file -> (3, H, W) in [0, 1], resized to ``size`` (H, W) if given."""
    path = Path(path)
    if not path.is_file():
        raise FeatInvError(f"image file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise FeatInvError(f"{path} is {image.width}x{image.height}, larger than {MAX_PIXELS} pixels")
            image = image.convert("RGB")
            if size is not None and (image.height, image.width) != tuple(size):
                image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return from_pil(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise FeatInvError(f"{path} is not a readable image ({type(error).__name__})") from error


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 in [0, 1]: 3 channels for RGB, 1 for greyscale (``L``)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_images(paths: Sequence[str | Path], size: tuple[int, int]) -> torch.Tensor:
    """Image files -> (B, 3, H, W) in [0, 1], each resized to ``size``."""
    if not paths:
        raise FeatInvError("no image files given")
    return torch.stack([load_image(p, size) for p in paths])


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> a PIL RGB image."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write (3, H, W) in [0, 1] as a PNG."""
    to_pil(image).save(path, format="PNG")


def make_grid(columns: Sequence[torch.Tensor], *, padding: int = 2, scale: int = 1) -> torch.Tensor:
    """Side-by-side grid: each entry of ``columns`` is (B, 3, H, W); row i shows image i of each.

    Columns are resized to the first column's size. Returns (3, H', W') in [0, 1].
    """
    b, _, h, w = columns[0].shape
    resized = [torch.nn.functional.interpolate(c.float(), size=(h * scale, w * scale), mode="nearest") for c in columns]
    h, w = h * scale, w * scale
    grid = torch.ones(3, b * (h + padding) + padding, len(columns) * (w + padding) + padding)
    for j, column in enumerate(resized):
        for i in range(b):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            grid[:, top : top + h, left : left + w] = column[i].clamp(0, 1)
    return grid


def heatmap(values: torch.Tensor, high: float = 1.0) -> torch.Tensor:
    """Values (B, H, W) from 0 to ``high`` as pictures (B, 3, H, W) in [0, 1], matplotlib's
    ``magma`` colours (black for 0, pale yellow for ``high`` and above)."""
    from matplotlib import colormaps

    scaled = (values.detach().float().cpu() / high).clamp(0, 1).numpy()
    return torch.from_numpy(colormaps["magma"](scaled)[..., :3]).permute(0, 3, 1, 2).float()
