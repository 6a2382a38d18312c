"""The DDIM sampler (Song, Meng & Ermon 2021, eq. 12), with eta for stochasticity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from featinv._native import sampler_loop
from featinv.sampling.guidance import Denoise
from featinv.sampling.noise import Generators, randn
from featinv.sampling.schedule import SamplerSchedule


def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: SamplerSchedule,
    *,
    generator: Generators = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run DDIM from noise ``x`` (B, C, H, W) to a sample of the same shape.

    Each step predicts ``x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)`` and moves to
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z``, with the double-precision
    coefficients of ``NoiseSchedule.ddim`` applied in the order diffusers' ``DDIMScheduler`` uses.

    Args:
        denoise: maps (x, t) to the noise prediction eps, same shape as x.
        generator: for the eta > 0 noise z (one generator, or one per sample).
        callback: called after each step with ``{"i", "t", "x", "denoised"}``.
    """
    if schedule.name not in ("ddim", "lcm"):
        raise ValueError(f"sample_ddim needs a DDIM (or LCM) schedule, got {schedule.name!r}")
    native = None if torch.is_grad_enabled() else sampler_loop()  # the C++ loop records no autograd graph
    if native is not None and all(row[4] == 0.0 for row in schedule.coefficients):  # eta = 0: C++ loop
        return _run_native(native, "ddim", denoise, x, schedule, callback)
    for i, (t, coefficients) in enumerate(zip(schedule.timesteps, schedule.coefficients, strict=True)):
        sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction, std = coefficients
        eps = denoise(x, t)
        denoised = (x - sqrt_beta * eps) / sqrt_alpha
        x = sqrt_alpha_prev * denoised + direction * eps
        if std > 0:
            x = x + std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return x


def _run_native(
    native, name: str, denoise: Denoise, x: torch.Tensor, schedule: SamplerSchedule, callback
) -> torch.Tensor:
    """The same loop in C++ (``featinv._sampler``): no Python between the denoiser calls."""
    hook = None
    if callback is not None:

        def hook(i: int, t: int, sample: torch.Tensor, denoised: torch.Tensor) -> None:
            callback({"i": i, "t": t, "x": sample, "denoised": denoised})

    rows = [list(row) for row in schedule.coefficients]
    return native(name, x, list(schedule.timesteps), rows, denoise, hook)
