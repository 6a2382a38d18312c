"""Reading and writing images: files <-> (B, 3, H, W) float tensors in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from featinv.errors import FeatInvError
from featinv.files import require_file

MAX_PIXELS = 64_000_000


def resize_and_crop(image: Image.Image, size: tuple[int, int], crop_pct: float = 1.0) -> Image.Image:
    """A classifier's eval transform (timm's: resize the shorter side, then centre-crop) to ``size``
    (H, W): scaled (bicubic) so that it covers ``size / crop_pct``, then the centre ``size`` cut out.
    A photo of another aspect ratio is cropped, never stretched."""
    height, width = int(size[0]), int(size[1])
    if not 0.0 < crop_pct <= 1.0:
        raise FeatInvError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if (image.height, image.width) == (height, width):
        return image
    scale = max(height / image.height, width / image.width) / crop_pct
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.BICUBIC)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(path: str | Path, size: tuple[int, int] | None = None, crop_pct: float = 1.0) -> torch.Tensor:
    """One image file -> (3, H, W) in [0, 1], brought to ``size`` (H, W) if given by
    :func:`resize_and_crop` (``crop_pct``: the classifier's, e.g. ``FeatureSpec.crop_pct``)."""
    path = require_file(path, "image file")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise FeatInvError(f"{path} is {image.width}x{image.height}, larger than {MAX_PIXELS} pixels")
            image = image.convert("RGB")
            if size is not None:
                image = resize_and_crop(image, size, crop_pct)
            return from_pil(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise FeatInvError(f"{path} is not a readable image ({type(error).__name__})") from error


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 in [0, 1]: 3 channels for RGB, 1 for greyscale (``L``)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_images(paths: Sequence[str | Path], size: tuple[int, int], crop_pct: float = 1.0) -> torch.Tensor:
    """Image files -> (B, 3, H, W) in [0, 1], each brought to ``size`` by :func:`resize_and_crop`."""
    if not paths:
        raise FeatInvError("no image files given")
    return torch.stack([load_image(p, size, crop_pct) for p in paths])


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


def png_data_url(picture: Image.Image, scale: int = 4) -> str:
    """A picture as a PNG data URL, scaled up ``scale`` times without smoothing (what the explorer's
    web page and notebook widget show)."""
    import base64
    import io

    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
