"""The FeatInv hint encoder: a classifier feature map -> the ControlNet's conditioning embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HintEncoder(nn.Module):
    """Bilinear upsample to the latent size, conv 3x3, SiLU, conv 3x3, SiLU, zero-initialised conv 3x3.

    It does not depend on the timestep, so a sampler runs it once per sample, not once per step.

    Args:
        feature_channels: C of the classifier's feature map.
        out_channels: the ControlNet's first block width (its ``conv_in`` output channels).
        latent_size: (H, W) of the diffusion model's sample.
        hidden_channels: width of the two intermediate convolutions (512 as published).
    """

    def __init__(
        self, feature_channels: int, out_channels: int, latent_size: tuple[int, int], hidden_channels: int = 512
    ) -> None:
        super().__init__()
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.conv_in = nn.Conv2d(feature_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_mid = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature maps -> (B, out_channels, H, W) conditioning embeddings."""
        x = F.interpolate(features, size=self.latent_size, mode="bilinear", align_corners=False)
        return self.head(self.conv_in(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """What follows ``conv_in``: SiLU, conv 3x3, SiLU, conv 3x3 (the fast path computes the upsample
        and ``conv_in`` fused, ``featinv.kernels.upsample_conv``)."""
        x = F.silu(self.conv_mid(F.silu(x)))
        return self.conv_out(x)
