"""Triton kernels against their PyTorch references: on CPU through TRITON_INTERPRET=1 (set by
conftest when there is no GPU), on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from featinv.sampling.schedule import NoiseSchedule

pytest.importorskip("triton")
from featinv.kernels.guided_update import guided_update_, guided_update_reference, triton_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _table(sampler: str, steps: int = 6) -> torch.Tensor:
    schedule = NoiseSchedule()
    made = schedule.ddim(steps) if sampler == "ddim" else schedule.dpmpp_2m(steps)
    return torch.tensor(made.coefficients, dtype=torch.float64, device=DEVICE)


def test_the_kernel_runs_here():
    assert triton_available(DEVICE)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 3, 7, 5)])  # 5 x 7 x 3 x 3 = 315: not a block multiple
def test_guided_update_matches_the_reference(sampler, eps_dtype, shape):
    g = torch.Generator().manual_seed(0)
    table = _table(sampler)
    x = torch.randn(shape, generator=g).to(DEVICE)
    eps_pair = torch.randn((2 * shape[0], *shape[1:]), generator=g).to(DEVICE, eps_dtype)
    prev = torch.randn(shape, generator=g).to(DEVICE)
    for step in (0, 2, len(table) - 1):  # first, middle (second order for DPM++) and last steps
        want_x, want_x0 = guided_update_reference(eps_pair, x, prev, table, step, 1.75, sampler)
        got_x = x.clone()
        got_x0 = guided_update_(
            eps_pair, got_x, prev, table, torch.tensor(step, device=DEVICE), 1.75, sampler, block=64
        )
        tolerance = 1e-6 * max(1.0, float(want_x.abs().max()), float(want_x0.abs().max()))
        assert float((got_x - want_x).abs().max()) <= tolerance * 4, (step, float((got_x - want_x).abs().max()))
        assert float((got_x0 - want_x0).abs().max()) <= tolerance * 4


def test_guided_update_takes_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    table = _table("dpmpp_2m")
    base = torch.randn(2, 4, 6, 10, generator=g).to(DEVICE)
    x = base[..., ::2]  # a strided view (2, 4, 6, 5)
    eps_pair = torch.randn(4, 4, 5, 6, generator=g).to(DEVICE).transpose(2, 3)  # (4, 4, 6, 5), transposed
    prev = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE)
    want_x, want_x0 = guided_update_reference(eps_pair, x, prev, table, 3, 2.5, "dpmpp_2m")
    x0 = guided_update_(eps_pair, x, prev, table, torch.tensor(3, device=DEVICE), 2.5, "dpmpp_2m")
    torch.testing.assert_close(x, want_x, rtol=1e-6, atol=1e-6)  # written back into the view
    torch.testing.assert_close(x0, want_x0, rtol=1e-6, atol=1e-6)
    assert torch.equal(base[..., 1::2], base[..., 1::2].clone())  # the other half untouched


def test_guided_update_rejects_bad_input():
    table = _table("ddim")
    x = torch.zeros(1, 4, 8, 8, device=DEVICE)
    step = torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match=r"eps_pair must be \(2B"):
        guided_update_(torch.zeros(1, 4, 8, 8, device=DEVICE), x, None, table, step, 1.0, "ddim")
    with pytest.raises(ValueError, match="x must be float32"):
        guided_update_(torch.zeros(2, 4, 8, 8, device=DEVICE), x.half(), None, table, step, 1.0, "ddim")
    with pytest.raises(ValueError, match="previous data prediction"):
        dpm = _table("dpmpp_2m")
        guided_update_(
            torch.zeros(2, 4, 8, 8, device=DEVICE), x, None, dpm, torch.tensor(2, device=DEVICE), 1.0, "dpmpp_2m"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_h", [True, False])
def test_inject_concat_matches_the_reference(dtype, with_h):
    from featinv.kernels.inject import inject_concat, inject_concat_reference

    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 7, 9, generator=g).to(DEVICE, dtype) if with_h else None
    skip = torch.randn(3, 6, 9, 7, generator=g).to(DEVICE, dtype).transpose(2, 3)  # non-contiguous
    res = torch.randn(3, 6, 7, 9, generator=g).to(DEVICE, dtype)
    got, want = inject_concat(h, skip, res, 0.8, block=128), inject_concat_reference(h, skip, res, 0.8)
    assert got.shape == ((3, 11, 7, 9) if with_h else (3, 6, 7, 9)) and got.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    if with_h:
        assert torch.equal(got[:, :5], h)  # copied bit for bit


def test_inject_concat_rejects_mismatched_shapes():
    from featinv.kernels.inject import inject_concat

    with pytest.raises(ValueError, match="same shape"):
        inject_concat(None, torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "size", "bias"),
    [((2, 5, 3, 4), (9, 13), True), ((1, 8, 8, 8), (32, 32), False), ((3, 3, 2, 2), (5, 3), True)],
)
@pytest.mark.heavy
def test_upsample_conv3x3_matches_the_reference(dtype, shape, size, bias):
    """Odd sizes (not block multiples, scale factors that are not integers), with and without bias,
    a non-contiguous input."""
    from featinv.kernels.upsample_conv import upsample_conv3x3, upsample_conv3x3_reference

    g = torch.Generator().manual_seed(4)
    batch, channels, h, w = shape
    features = torch.randn(batch, channels, w, h, generator=g).transpose(2, 3).to(DEVICE, dtype)
    weight = torch.randn(7, channels, 3, 3, generator=g).to(DEVICE, dtype)
    b = torch.randn(7, generator=g).to(DEVICE, dtype) if bias else None
    got = upsample_conv3x3(features, weight, b, size, block=64)
    want = upsample_conv3x3_reference(features.float(), weight.float(), None if b is None else b.float(), size)
    assert got.shape == (batch, 7, *size) and got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert float((got.float() - want).abs().max()) <= tolerance * float(want.abs().max())


def test_upsample_conv3x3_checks_its_inputs_and_leaves_larger_maps_to_the_reference():
    from featinv.kernels.upsample_conv import upsample_conv3x3, upsample_conv3x3_reference

    with pytest.raises(ValueError, match="3x3 weight"):
        upsample_conv3x3(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 1, 1), None, (8, 8))
    with pytest.raises(ValueError, match="takes 3 channels"):
        upsample_conv3x3(torch.zeros(1, 2, 4, 4), torch.zeros(3, 3, 3, 3), None, (8, 8))
    features, weight = torch.randn(1, 2, 8, 8).to(DEVICE), torch.randn(3, 2, 3, 3).to(DEVICE)
    # a map at least as large as the output: nothing to save, the reference runs (same numbers exactly)
    assert torch.equal(
        upsample_conv3x3(features, weight, None, (6, 6)), upsample_conv3x3_reference(features, weight, None, (6, 6))
    )
