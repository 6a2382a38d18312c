"""CPU benchmarks (pytest-benchmark): tiny-model reconstruction, and schedule tables C++ vs Python.

make bench
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_model  # noqa: E402

from featinv import Reconstructor  # noqa: E402
from featinv._native import native_available, native_sampler_available, schedule_tables  # noqa: E402
from featinv.sampling.schedule import NoiseSchedule  # noqa: E402


def test_tiny_reconstruction_50_steps(benchmark):
    model = make_model()
    reconstructor = Reconstructor(model)
    features = torch.rand(4, *model.feature_spec.shape)
    result = benchmark(lambda: reconstructor.reconstruct(features=features, steps=50, progress=False))
    assert result.images.shape == (4, 3, 16, 16)


@pytest.mark.parametrize(
    "impl", ["python", pytest.param("cpp", marks=pytest.mark.skipif(not native_available(), reason="no _C"))]
)
def test_schedule_tables(benchmark, impl):
    tables = schedule_tables(impl)
    schedule = NoiseSchedule()
    result = benchmark(lambda: (schedule.ddim(50, impl=impl), schedule.dpmpp_2m(50, impl=impl)))
    assert len(result[0]) == 50 and tables is not None


@pytest.mark.parametrize(
    "impl",
    ["python", pytest.param("cpp", marks=pytest.mark.skipif(not native_sampler_available(), reason="no _sampler"))],
)
def test_sampler_loop_overhead(benchmark, impl, monkeypatch):
    """50 DDIM steps around a near-free denoiser: what the loop itself costs, C++ vs Python."""
    from featinv.sampling import sample_ddim

    monkeypatch.setenv("FEATINV_IMPL", impl)
    schedule = NoiseSchedule().ddim(50)
    x = torch.randn(1, 4, 8, 8)
    result = benchmark(lambda: sample_ddim(lambda s, t: s * 0.1, x, schedule))
    assert result.shape == x.shape
