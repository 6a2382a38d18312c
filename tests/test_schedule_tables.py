"""Schedule tables: C++ and Python agree bit for bit, and both equal diffusers' schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from featinv._native import native_available, schedule_tables
from featinv.errors import FeatInvError
from featinv.sampling.schedule import NoiseSchedule

IMPLS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not native_available(), reason="featinv._C not built"))]
STEP_COUNTS = [1, 3, 7, 10, 20, 25, 33, 50, 999, 1000]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.skipif(not native_available(), reason="featinv._C not built")
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_cpp_and_python_tables_are_identical(schedule):
    cpp, py = schedule_tables("cpp"), schedule_tables("python")
    betas = cpp.betas(1000, 0.0001, 0.02, schedule)
    assert betas == py.betas(1000, 0.0001, 0.02, schedule)
    alphas = cpp.alphas_cumprod(betas)
    assert alphas == py.alphas_cumprod(betas)
    for spacing in ("leading", "trailing", "linspace"):
        for steps in STEP_COUNTS:
            ddim_t = cpp.ddim_timesteps(1000, steps, spacing, 1)
            assert ddim_t == py.ddim_timesteps(1000, steps, spacing, 1)
            dpm_t = cpp.dpmpp_timesteps(1000, steps, spacing, 1)
            assert dpm_t == py.dpmpp_timesteps(1000, steps, spacing, 1)
            if max(ddim_t) < 1000:
                assert cpp.ddim_coefficients(alphas, ddim_t, 1000, False, 0.3) == py.ddim_coefficients(
                    alphas, ddim_t, 1000, False, 0.3
                )
            if max(dpm_t) < 1000 and len(set(dpm_t)) == len(dpm_t):
                assert cpp.dpmpp_2m_coefficients(alphas, dpm_t) == py.dpmpp_2m_coefficients(alphas, dpm_t)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(impl, beta_schedule):
    ours = NoiseSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule=beta_schedule).alphas_cumprod(impl)
    ref = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule=beta_schedule).alphas_cumprod
    # diffusers computes in float32; ours is double.
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_ddim_timesteps_match_diffusers(impl, spacing, steps):
    reference = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    reference.set_timesteps(steps)
    assert list(schedule_tables(impl).ddim_timesteps(1000, steps, spacing, 1)) == reference.timesteps.tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 10, 20, 50, 999])
def test_dpmpp_timesteps_match_diffusers(impl, spacing, steps):
    reference = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    reference.set_timesteps(steps)
    assert list(schedule_tables(impl).dpmpp_timesteps(1000, steps, spacing, 1)) == reference.timesteps.tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_ddim_coefficients_reproduce_the_diffusers_step(impl):
    """One DDIM update with our coefficients equals DDIMScheduler.step (float64 inputs)."""
    schedule = NoiseSchedule(**SD).ddim(10, eta=0.0, impl=impl)
    reference = DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    reference.set_timesteps(10)
    ours_alphas = torch.tensor(NoiseSchedule(**SD).alphas_cumprod(impl), dtype=torch.float64)
    reference.alphas_cumprod = ours_alphas
    reference.final_alpha_cumprod = ours_alphas[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    for t, (sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction, std) in zip(
        schedule.timesteps, schedule.coefficients, strict=True
    ):
        expected = reference.step(eps, t, x).prev_sample
        assert std == 0.0
        ours = sqrt_alpha_prev * ((x - sqrt_beta * eps) / sqrt_alpha) + direction * eps
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_timesteps_outside_the_training_range_are_rejected():
    # leading spacing with steps_offset=1 and 1000 steps reaches t=1000, past the last trained step:
    # the tables refuse it, and the schedule's own range check (what --steps is told) stops before.
    tables = schedule_tables()
    steps = list(tables.ddim_timesteps(1000, 1000, "leading", 1))
    alphas = NoiseSchedule(**SD).alphas_cumprod()
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        tables.ddim_coefficients(alphas, steps, 1000, False, 0.0)
    with pytest.raises(FeatInvError, match=r"steps must be an integer in \[1, 999\], got 1000"):
        NoiseSchedule(**SD).ddim(1000)
    NoiseSchedule(**SD).ddim(999)
    NoiseSchedule(**SD).dpmpp_2m(999)


def test_bad_arguments_are_rejected():
    with pytest.raises(FeatInvError, match="clip_sample"):
        NoiseSchedule(clip_sample=True)
    with pytest.raises(FeatInvError, match="steps must be an integer"):
        NoiseSchedule().ddim(0)
    with pytest.raises(FeatInvError, match="eta must be in"):
        NoiseSchedule().ddim(10, eta=2.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cubic").ddim(10)
    with pytest.raises(FeatInvError, match="FEATINV_IMPL"):
        schedule_tables("fortran")


def test_cpp_is_refused_when_not_built(monkeypatch):
    import featinv._native as native

    monkeypatch.setattr(native, "_load_native", lambda: None)
    with pytest.raises(FeatInvError, match="not built"):
        native.schedule_tables("cpp")
    from featinv.sampling import schedule_tables as python_tables

    assert native.schedule_tables("auto") is python_tables


def test_feature_impl_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FEATINV_IMPL", "python")
    from featinv.sampling import schedule_tables as python_tables

    assert schedule_tables() is python_tables
