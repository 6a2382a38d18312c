"""Classifier-free guidance (Ho & Salimans 2022) around a batched two-branch denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, int], torch.Tensor]


def classifier_free_guidance(denoise_pair: Denoise, guidance_scale: float) -> Denoise:
    """Wrap a denoiser that sees both branches in one batch.

    Args:
        denoise_pair: maps (2B, ...) samples and a timestep to (2B, ...) noise predictions, the
            unconditional branch first (its conditioning batch is ordered that way).
        guidance_scale: s in ``eps_u + s * (eps_c - eps_u)``.

    Returns:
        A denoiser of (B, ...) samples.
    """

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        eps_uncond, eps_cond = denoise_pair(torch.cat([x, x]), t).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return denoise
