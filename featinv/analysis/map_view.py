"""A feature map as pictures, at its own grid resolution: its channels' first three principal
components as RGB, and its per-position norm. The components and their colour ranges are fitted
once per model, on its example images' maps, and then fixed, so that a colour means the same in
every image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featinv.errors import FeatInvError


@dataclass(frozen=True)
class MapPalette:
    """The fixed projection: ``mean`` (C,), ``components`` (3, C), per-component ``low``/``high``
    (3,) (the 1st and 99th percentiles on the fitting maps), the norm's ``norm_high``, and the
    fitting maps' mean map (1, C, h, w), the ``mean`` region operation's replacement."""

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    norm_high: float
    mean_map: torch.Tensor

    @classmethod
    def fit(cls, maps: torch.Tensor) -> MapPalette:
        """Fit on maps (N, C, h, w): every position of every map is a sample of C channels."""
        if maps.ndim != 4 or len(maps) == 0:
            raise FeatInvError(f"maps must have shape (N, C, h, w) with N >= 1, got {tuple(maps.shape)}")
        maps = maps.detach().float().cpu()
        samples = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])  # (N*h*w, C)
        mean = samples.mean(0)
        centred = samples - mean
        count = min(3, centred.shape[1])
        _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
        components = torch.zeros(3, samples.shape[1])
        components[:count] = vectors[:count]
        # A principal direction's sign is arbitrary: fix it so that results do not flip between runs.
        signs = torch.sign(components.sum(1, keepdim=True)).clamp_min(0) * 2 - 1
        components = components * signs
        projected = centred @ components.T  # (S, 3)
        low = torch.quantile(projected, 0.01, dim=0)
        high = torch.quantile(projected, 0.99, dim=0)
        norm_high = float(torch.quantile(samples.norm(dim=1), 0.99).clamp_min(1e-12))
        return cls(mean, components, low, torch.maximum(high, low + 1e-6), norm_high, maps.mean(0, keepdim=True))

    def rgb(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1]: the first three components of maps (B, C, h, w) as colours."""
        self._check(features)
        samples = features.detach().float().cpu().permute(0, 2, 3, 1) - self.mean  # (B, h, w, C)
        projected = (samples @ self.components.T - self.low) / (self.high - self.low)
        return projected.clamp(0, 1).permute(0, 3, 1, 2)

    def norm(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) in [0, 1]: each position's channel norm over the fitting maps' 99th percentile."""
        self._check(features)
        return (features.detach().float().cpu().norm(dim=1, keepdim=True) / self.norm_high).clamp(0, 1)

    def _check(self, features: torch.Tensor) -> None:
        if features.ndim != 4 or features.shape[1] != self.mean.numel():
            raise FeatInvError(
                f"features must have shape (B, {self.mean.numel()}, h, w) for this palette, got {tuple(features.shape)}"
            )
