"""The denoiser interface every engine backend implements."""

from __future__ import annotations

from typing import Protocol

import torch


class Denoiser(Protocol):
    """Maps a noisy batch, a timestep and its conditioning to the noise prediction.

    Shapes: ``sample`` (B, C, H, W); ``hint`` (B, C0, H, W) from the hint encoder; ``context``
    (B, L, D). Returns eps (B, C, H, W) in float32. Backends must agree numerically with ``eager``.
    """

    def __call__(
        self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor: ...
