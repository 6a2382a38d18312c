"""The ControlNet conditioning injection, fused: the residual times its scale added into the UNet's
skip connection and written straight into the concatenated input of the up block.

Unfused, diffusers does ``skip = skip + res`` (one pass, a new tensor) and later
``torch.cat([h, skip], dim=1)`` (another pass); here one pass reads h, skip and res and writes the
concatenation ``[h, skip + scale * res]`` (B, Ch + Cs, H, W). The mid-block add ``mid + scale * res``
is the same kernel with no ``h``.
"""

from __future__ import annotations

import torch
from featinv.kernels.guided_update import triton, triton_available

if triton is not None:
    import triton.language as tl


def inject_concat_reference(
    h: torch.Tensor | None, skip: torch.Tensor, res: torch.Tensor, scale: float
) -> torch.Tensor:
    """``cat([h, skip + scale * res], dim=1)`` (or just the sum when ``h`` is None), in skip's dtype."""
    added = (skip.float() + scale * res.float()).to(skip.dtype)
    return added if h is None else torch.cat([h, added], dim=1)


if triton is not None:

    @triton.jit
    def _inject_concat_kernel(
        h_ptr,
        skip_ptr,
        res_ptr,
        out_ptr,
        scale,
        h_per_sample,
        s_per_sample,
        BLOCK: tl.constexpr,
    ):
        sample = tl.program_id(1)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        out_per_sample = h_per_sample + s_per_sample
        out_base = out_ptr + sample * out_per_sample
        in_h = offsets < h_per_sample
        h = tl.load(h_ptr + sample * h_per_sample + offsets, mask=in_h, other=0.0)
        tl.store(out_base + offsets, h, mask=in_h)
        s_offsets = offsets - h_per_sample
        in_s = (offsets >= h_per_sample) & (s_offsets < s_per_sample)
        skip = tl.load(skip_ptr + sample * s_per_sample + s_offsets, mask=in_s, other=0.0).to(tl.float32)
        res = tl.load(res_ptr + sample * s_per_sample + s_offsets, mask=in_s, other=0.0).to(tl.float32)
        value = skip + scale * res
        tl.store(out_base + offsets, value.to(out_ptr.dtype.element_ty), mask=in_s)


def inject_concat(
    h: torch.Tensor | None, skip: torch.Tensor, res: torch.Tensor, scale: float = 1.0, *, block: int = 1024
) -> torch.Tensor:
    """Fused ``cat([h, skip + scale * res], dim=1)`` for NCHW tensors (B, Ch, H, W), (B, Cs, H, W);
    falls back to the reference where Triton cannot run."""
    if skip.shape != res.shape:
        raise ValueError(f"skip and res must have the same shape, got {tuple(skip.shape)} and {tuple(res.shape)}")
    if h is not None and (h.shape[0] != skip.shape[0] or h.shape[2:] != skip.shape[2:] or h.dtype != skip.dtype):
        raise ValueError(f"h {tuple(h.shape)} {h.dtype} does not fit skip {tuple(skip.shape)} {skip.dtype}")
    if not triton_available(skip.device):
        return inject_concat_reference(h, skip, res, scale)
    batch = skip.shape[0]
    h_c = h.contiguous() if h is not None else skip.new_empty((batch, 0, *skip.shape[2:]))
    skip_c, res_c = skip.contiguous(), res.contiguous()
    out = skip.new_empty((batch, h_c.shape[1] + skip.shape[1], *skip.shape[2:]))
    h_per, s_per = h_c[0].numel(), skip_c[0].numel()
    grid = (triton.cdiv(h_per + s_per, block), batch)
    _inject_concat_kernel[grid](h_c, skip_c, res_c, out, float(scale), h_per, s_per, BLOCK=block)
    return out
