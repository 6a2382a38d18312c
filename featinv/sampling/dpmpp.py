"""The DPM-Solver++(2M) sampler (Lu et al. 2022, Algorithm 2), data prediction, midpoint form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from featinv._native import sampler_loop
from featinv.sampling.ddim import _run_native
from featinv.sampling.guidance import Denoise
from featinv.sampling.noise import Generators
from featinv.sampling.schedule import SamplerSchedule


def sample_dpmpp_2m(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: SamplerSchedule,
    *,
    generator: Generators = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) from noise ``x`` (B, C, H, W).

    Each step converts eps to the data prediction ``x0 = a_x*x + a_eps*eps`` and updates
    ``x = c_x*x + c_d0*x0 + c_d1*x0_prev``; the first and last steps are first order, as in
    diffusers' ``DPMSolverMultistepScheduler`` (``final_sigmas_type="zero"``).

    Args:
        denoise: maps (x, t) to eps.
        generator: unused (the sampler is deterministic); accepted for the common signature.
        callback: called after each step with ``{"i", "t", "x", "denoised"}``.
    """
    del generator
    if schedule.name != "dpmpp_2m":
        raise ValueError(f"sample_dpmpp_2m needs a DPM-Solver++(2M) schedule, got {schedule.name!r}")
    native = None if torch.is_grad_enabled() else sampler_loop()  # the C++ loop records no autograd graph
    if native is not None:
        return _run_native(native, "dpmpp_2m", denoise, x, schedule, callback)
    x0_prev = None
    for i, (t, (a_x, a_eps, c_x, c_d0, c_d1)) in enumerate(zip(schedule.timesteps, schedule.coefficients, strict=True)):
        eps = denoise(x, t)
        x0 = a_x * x + a_eps * eps
        x_next = c_x * x + c_d0 * x0
        if c_d1 != 0.0:
            x_next = x_next + c_d1 * x0_prev
        if callback is not None:
            callback({"i": i, "t": t, "x": x_next, "denoised": x0})
        x0_prev, x = x0, x_next
    return x
