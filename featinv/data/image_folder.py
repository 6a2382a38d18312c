"""User data in ImageNet layout (``<root>/<class>/*.JPEG``) as a training stream.

The same interface as :class:`featinv.data.streams.ShapesStream` (``draw``/``take``/``batch``),
so every trainer takes either. Training transforms as in the paper: random resized crop and
horizontal flip, seeded by (seed, batch key, row) so that a resumed run sees the same pixels.
Images are decoded on CPU threads; feature maps are computed batched on the device by the trainer.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from featinv.data.streams import draw_batch
from featinv.errors import FeatInvError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageFolderStream:
    """Images of ``root/<class>/`` at ``size`` pixels; ``augment`` picks the paper's training
    transforms (random resized crop + flip) over resize + centre crop (+ the drawn flip)."""

    def __init__(self, root: str | Path, size: int, *, seed: int = 0, augment: bool = True, workers: int = 4) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FeatInvError(f"image folder not found: {root}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
            self.files += found
            labels += [label] * len(found)
        if not self.files:
            raise FeatInvError(f"no images in {root}: expected ImageNet layout <root>/<class>/*.JPEG")
        self.labels = torch.tensor(labels)
        self.size, self.seed, self.augment, self.workers = size, seed, augment, workers
        listing = hashlib.sha256("\n".join(str(p.relative_to(root)) for p in self.files).encode()).hexdigest()
        self.identity = {"root": str(root.resolve()), "files_sha256": listing, "image_size": size, "augment": augment}
        crop = (
            v2.RandomResizedCrop(size, antialias=True)
            if augment
            else v2.Compose([v2.Resize(size), v2.CenterCrop(size)])
        )
        self.transform = v2.Compose([v2.ToImage(), crop, v2.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.files)

    def draw(self, key: int, batch_size: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """File indices (B,) and flip flags (B,) of batch ``key``."""
        return draw_batch(self.seed, key, len(self.files), batch_size, flip)

    def _decode(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise FeatInvError(f"cannot read training image {path} ({error})") from error

    def take(self, index: torch.Tensor, flips: torch.Tensor, key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, size, size) in [0, 1] and labels (B,), on the CPU. Files are decoded on
        threads; the random crops run in order, row r of batch ``key`` seeded by (seed, key, r)."""
        index_list, flip_list = index.cpu().tolist(), flips.cpu().tolist()
        with ThreadPoolExecutor(self.workers) as pool:
            decoded = list(pool.map(self._decode, index_list))
        images = []
        for row, (image, flip) in enumerate(zip(decoded, flip_list, strict=True)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + key) * 4_099 + row)
                pixels = self.transform(image)
            images.append(pixels.flip(-1) if flip else pixels)
        return torch.stack(images), self.labels[index.cpu()]

    def batch(self, key: int, batch_size: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(*self.draw(key, batch_size, flip), key=key)
