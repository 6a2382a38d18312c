"""The reconstructor: seeds, batching, samplers, guidance and input validation."""

from __future__ import annotations

import pytest
import torch

from featinv import Reconstructor
from featinv.errors import FeatInvError


@pytest.fixture
def reconstructor(tiny_model):
    return Reconstructor(tiny_model)


@pytest.fixture
def features(tiny_model):
    return torch.rand(3, *tiny_model.feature_spec.shape, generator=torch.Generator().manual_seed(0))


def test_results_do_not_depend_on_batch_size(reconstructor, features):
    one = reconstructor.reconstruct(features=features, steps=6, batch_size=1, progress=False)
    three = reconstructor.reconstruct(features=features, steps=6, batch_size=3, progress=False)
    torch.testing.assert_close(one.samples, three.samples, rtol=1e-5, atol=1e-5)
    assert one.images.shape == (3, 3, 16, 16)
    assert 0.0 <= float(one.images.min()) and float(one.images.max()) <= 1.0


def test_seeds_reproduce_and_differ(reconstructor, features):
    a = reconstructor.reconstruct(features=features[:1], steps=4, seed=1, progress=False).samples
    b = reconstructor.reconstruct(features=features[:1], steps=4, seed=1, progress=False).samples
    c = reconstructor.reconstruct(features=features[:1], steps=4, seed=2, progress=False).samples
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    gen = reconstructor.reconstruct(
        features=features[:1], steps=4, generator=torch.Generator().manual_seed(1), progress=False
    ).samples
    assert torch.equal(a, gen)


def test_eta_adds_seeded_noise(reconstructor, features):
    base = reconstructor.reconstruct(features=features[:2], steps=5, progress=False).samples
    noisy = reconstructor.reconstruct(features=features[:2], steps=5, eta=1.0, progress=False).samples
    again = reconstructor.reconstruct(features=features[:2], steps=5, eta=1.0, progress=False).samples
    assert torch.equal(noisy, again)
    assert not torch.allclose(base, noisy)


def test_guidance_and_samplers(reconstructor, features):
    guided = reconstructor.reconstruct(features=features[:1], steps=5, guidance_scale=3.0, progress=False).samples
    plain = reconstructor.reconstruct(features=features[:1], steps=5, guidance_scale=1.0, progress=False).samples
    dpm = reconstructor.reconstruct(features=features[:1], steps=5, sampler="dpmpp", progress=False).samples
    assert not torch.allclose(guided, plain)
    assert torch.isfinite(dpm).all() and not torch.allclose(dpm, plain)


def test_images_in_means_their_features(reconstructor, tiny_images):
    from_images = reconstructor.reconstruct(tiny_images, steps=3, progress=False)
    from_features = reconstructor.reconstruct(features=reconstructor.features(tiny_images), steps=3, progress=False)
    assert torch.equal(from_images.samples, from_features.samples)
    pooled = reconstructor.reconstruct(tiny_images, steps=3, pooled=True, progress=False)
    torch.testing.assert_close(pooled.features, from_images.features.mean((2, 3), keepdim=True).expand(3, -1, 2, 2))


def test_callback_sees_every_step(reconstructor, features):
    seen = []
    reconstructor.reconstruct(
        features=features,
        steps=4,
        batch_size=2,
        progress=False,
        callback=lambda info: seen.append((info["batch"], info["i"], info["denoised"].shape)),
    )
    assert [(b, i) for b, i, _ in seen] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": torch.rand(1, 7, 2, 2)}, r"shape \(1, 7, 2, 2\), expected \(B, 256, 2, 2\) for resnet18"),
        ({"features": torch.rand(1, 256, 3, 3)}, r"expected \(B, 256, 2, 2\)"),
        ({"features": torch.full((1, 256, 2, 2), float("inf"))}, "NaN or Inf"),
        ({"features": torch.rand(1, 256, 2, 2), "sampler": "euler"}, "sampler must be one of ddim, dpmpp"),
        ({"features": torch.rand(1, 256, 2, 2), "steps": 0}, r"steps must be an integer in \[1, 999\]"),
        ({"features": torch.rand(1, 256, 2, 2), "batch_size": 0}, r"batch_size must be an integer in \[1, 8192\]"),
        (
            {"features": torch.rand(1, 256, 2, 2), "guidance_scale": -1.0},
            r"guidance_scale must be a number in \[0, 50\]",
        ),
        ({"features": torch.rand(1, 256, 2, 2), "latents": torch.rand(2, 3, 16, 16)}, "latents must have shape"),
        ({}, "exactly one of images or features"),
    ],
)
def test_bad_input_is_named(reconstructor, kwargs, message):
    with pytest.raises(FeatInvError, match=message):
        reconstructor.reconstruct(progress=False, **kwargs)


def test_cuda_without_a_gpu_is_a_clear_error(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FeatInvError, match="no CUDA GPU"):
        Reconstructor(tiny_model, device="cuda")


def test_cpp_and_python_schedule_tables_give_identical_reconstructions(monkeypatch, reconstructor, features):
    from featinv._native import native_available

    if not native_available():
        pytest.skip("featinv._C not built")
    results = {}
    for impl in ("cpp", "python"):
        monkeypatch.setenv("FEATINV_IMPL", impl)
        for sampler in ("ddim", "dpmpp"):
            results[impl, sampler] = reconstructor.reconstruct(
                features=features[:1], steps=7, sampler=sampler, progress=False
            ).samples
    for sampler in ("ddim", "dpmpp"):
        assert torch.equal(results["cpp", sampler], results["python", sampler])


@pytest.mark.slow
def test_compiled_backend_matches_eager(tiny_model, tiny_images):
    """torch.compile of the denoiser graph (Inductor on CPU): same reconstruction within fp32 noise."""
    kwargs = {"steps": 6, "seed": 2, "progress": False}
    eager = Reconstructor(tiny_model).reconstruct(tiny_images, **kwargs)
    compiled = Reconstructor(tiny_model, backend="compiled").reconstruct(tiny_images, **kwargs)
    assert float((compiled.samples - eager.samples).abs().max()) <= 1e-4


@pytest.mark.heavy
def test_padded_batches_give_the_same_images_and_callbacks_see_only_real_rows(tiny_model, features):
    from featinv.engine.fast import FastPath

    want = Reconstructor(tiny_model).reconstruct(features=features[:3], steps=3, progress=False)
    padded = Reconstructor(tiny_model, pad_batches=True)
    seen, rows = [], []
    guided = padded.guided_denoiser
    padded.guided_denoiser = lambda f, scale: seen.append(len(f)) or guided(f, scale)
    got = padded.reconstruct(
        features=features[:3], steps=3, progress=False, callback=lambda i: rows.append(len(i["x"]))
    )
    assert seen == [4] and rows == [3, 3, 3]  # the denoiser ran 4 rows, the caller saw its 3
    assert got.images.shape == want.images.shape and got.samples.shape == want.samples.shape
    assert float((got.samples - want.samples).abs().max()) <= 1e-5 * float(want.samples.abs().max())
    seen.clear()
    padded.reconstruct(features=features[:3], steps=2, sampler="ddim", eta=0.5, progress=False)
    assert seen == [3]  # per-image noise every step: not padded
    exact = Reconstructor(tiny_model, pad_batches=True, exact_batches=[3])
    guided_exact = exact.guided_denoiser
    exact.guided_denoiser = lambda f, scale: seen.append(len(f)) or guided_exact(f, scale)
    seen.clear()
    exact.reconstruct(features=features[:3], steps=2, progress=False)
    exact.reconstruct(features=features[:2], steps=2, progress=False)
    assert seen == [3, 2]  # 3 listed as exact, 2 a power of two
    with pytest.raises(FeatInvError, match="exact_batches item must be a positive integer, got 0"):
        Reconstructor(tiny_model, pad_batches=True, exact_batches=[0])
    padded.fast = FastPath(padded.model, compile_mode=None)  # what backend="fast" builds, eager pieces on the CPU
    fast = padded.reconstruct(features=features[:3], steps=3, progress=False)
    assert [key[0] for key in padded.fast._graphs] == [4]
    assert float((fast.samples - want.samples).abs().max()) <= 1e-5 * float(want.samples.abs().max())
