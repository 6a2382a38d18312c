"""Schedules and sampler loops: pure functions of a denoiser ``(x, t) -> eps``."""

import warnings

from featinv.sampling.ddim import sample_ddim
from featinv.sampling.dpmpp import sample_dpmpp_2m
from featinv.sampling.guidance import classifier_free_guidance
from featinv.sampling.schedule import NoiseSchedule, SamplerSchedule

# The loop of each sampler of featinv.choices.SAMPLERS (the one list of names). lcm: DDIM's loop on
# a distilled model's rows.
SAMPLER_LOOPS = {"ddim": sample_ddim, "dpmpp": sample_dpmpp_2m, "lcm": sample_ddim}


def __getattr__(name: str):
    if name == "SAMPLERS":  # the old name of SAMPLER_LOOPS: SAMPLERS is featinv.choices' list of names
        warnings.warn(
            "featinv.sampling.SAMPLERS is deprecated: use featinv.sampling.SAMPLER_LOOPS (the loops) or "
            "featinv.choices.SAMPLERS (the names)",
            DeprecationWarning,
            stacklevel=2,
        )
        return SAMPLER_LOOPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SAMPLER_LOOPS",
    "NoiseSchedule",
    "SamplerSchedule",
    "classifier_free_guidance",
    "sample_ddim",
    "sample_dpmpp_2m",
]
