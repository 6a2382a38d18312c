"""Schedules and sampler loops: pure functions of a denoiser ``(x, t) -> eps``."""

from featinv.sampling.ddim import sample_ddim
from featinv.sampling.dpmpp import sample_dpmpp_2m
from featinv.sampling.guidance import classifier_free_guidance
from featinv.sampling.schedule import NoiseSchedule, SamplerSchedule

SAMPLERS = {"ddim": sample_ddim, "dpmpp": sample_dpmpp_2m, "lcm": sample_ddim}  # lcm: DDIM's loop, its rows

__all__ = ["SAMPLERS", "NoiseSchedule", "SamplerSchedule", "classifier_free_guidance", "sample_ddim", "sample_dpmpp_2m"]
