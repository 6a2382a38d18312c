"""Training streams: batch ``key`` a pure function of (seed, key), so that a resumed run draws the
same batches. :class:`ShapesStream` draws from a pool of shapes images; the image-folder stream
(:mod:`featinv.data.image_folder`) uses the same :func:`draw_batch`."""

from __future__ import annotations

import torch

from featinv.data.shapes import shapes_pool


def draw_batch(seed: int, key: int, pool_size: int, batch_size: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B,) into a pool and horizontal-flip flags (B,) of batch ``key``: a pure function of
    (seed, key), shared by every training stream so that resumed runs draw the same batches."""
    g = torch.Generator().manual_seed(seed * 7_919 + key)
    index = torch.randint(0, pool_size, (batch_size,), generator=g)
    flips = torch.rand(batch_size, generator=g) < 0.5 if flip else torch.zeros(batch_size, dtype=torch.bool)
    return index, flips


class ShapesStream:
    """Training batches drawn from a pre-generated pool of ``shapes`` images on ``device``.

    Batch ``key`` is a pure function of (seed, key): pool indices and horizontal flips."""

    def __init__(self, pool_size: int, seed: int, device: torch.device, size: int = 32, chunk: int = 2048) -> None:
        pool = shapes_pool(pool_size, seed, size, device=device, chunk=chunk)
        self.images, self.labels = pool.images.to(device), pool.labels.to(device)
        self.seed = seed
        self.identity = {"seed": seed, "image_size": size}

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, key: int, batch_size: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool indices (B,) and flip flags (B,) of batch ``key``, on the pool's device."""
        index, flips = draw_batch(self.seed, key, len(self.images), batch_size, flip)
        return index.to(self.images.device), flips.to(self.images.device)

    def take(self, index: torch.Tensor, flips: torch.Tensor, key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) and labels (B,) for pool ``index``, flipped where ``flips``
        (``key`` is for streams with random crops)."""
        images = self.images[index]
        return torch.where(flips[:, None, None, None], images.flip(-1), images), self.labels[index]

    def batch(self, key: int, batch_size: int, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.take(*self.draw(key, batch_size, flip))
