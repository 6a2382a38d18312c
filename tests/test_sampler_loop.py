"""The C++ sampler loops (featinv._sampler) against the Python loops: the same arithmetic, so the
same samples; FEATINV_IMPL switches between them."""

from __future__ import annotations

import pytest
import torch

from featinv import _native
from featinv.errors import FeatInvError
from featinv.pipeline import Reconstructor

needs_native = pytest.mark.skipif(not _native.native_sampler_available(), reason="featinv._sampler not built")


@needs_native
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_cpp_and_python_loops_agree_on_the_tiny_model(sampler, tiny_model, tiny_images, monkeypatch):
    samples, steps_seen = {}, {}
    for impl in ("python", "cpp"):
        monkeypatch.setenv("FEATINV_IMPL", impl)
        seen: list[int] = []
        steps_seen[impl] = seen
        result = Reconstructor(tiny_model).reconstruct(
            tiny_images,
            steps=12,
            sampler=sampler,
            seed=3,
            progress=False,
            callback=lambda info, s=seen: s.append(info["i"]),
        )
        samples[impl] = result.samples
    assert float((samples["cpp"] - samples["python"]).abs().max()) <= 1e-6
    assert steps_seen["cpp"] == steps_seen["python"] == list(range(12))


@needs_native
def test_ddim_with_eta_runs_the_python_loop_even_under_cpp(tiny_model, tiny_images, monkeypatch):
    monkeypatch.setenv("FEATINV_IMPL", "cpp")
    a = Reconstructor(tiny_model).reconstruct(tiny_images, steps=5, eta=0.5, seed=1, progress=False).samples
    monkeypatch.setenv("FEATINV_IMPL", "python")
    b = Reconstructor(tiny_model).reconstruct(tiny_images, steps=5, eta=0.5, seed=1, progress=False).samples
    assert torch.equal(a, b)


def test_cpp_without_the_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_native, "_load_sampler", lambda: None)
    assert _native.sampler_loop("auto") is None and _native.sampler_loop("python") is None
    with pytest.raises(FeatInvError, match="featinv._sampler is not built"):
        _native.sampler_loop("cpp")


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_with_autograd_recording_the_samplers_keep_the_graph(sampler, impl, monkeypatch):
    """Distillation differentiates through a few-step solve; the C++ loop records no graph, so it
    must not be taken then (it silently returned a sample without gradients)."""
    from featinv.sampling import SAMPLER_LOOPS, NoiseSchedule

    monkeypatch.setenv("FEATINV_IMPL", impl if _native.native_sampler_available() else "python")
    scale = torch.nn.Parameter(torch.tensor(0.5))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    schedule = NoiseSchedule().for_sampler(sampler, 4)
    sample = SAMPLER_LOOPS[sampler](lambda x, t: scale * x, x, schedule)
    sample.square().sum().backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    with torch.no_grad():  # and under no_grad the same sample (either loop)
        torch.testing.assert_close(SAMPLER_LOOPS[sampler](lambda x, t: scale * x, x, schedule), sample.detach())
