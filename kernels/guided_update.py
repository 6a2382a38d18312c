"""Classifier-free guidance fused with the sampler update (DDIM or DPM-Solver++(2M)), in place.

One pass over the latents instead of five elementwise kernels per step: read both guidance branches
of eps, the sample x and (DPM++) the previous data prediction; write the new x and this step's data
prediction. The step's coefficients are read from a device table at a device step index, so a CUDA
graph that contains the kernel stays valid for every step (nothing is recaptured).

Math (fp32 in registers whatever the storage dtype), with ``eps = u + s (c - u)``:

* DDIM (eta = 0), row ``(sqrt(1-a_t), sqrt(a_t), sqrt(a_prev), sqrt(1-a_prev), 0)``:
  ``x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)``; ``x = sqrt(a_prev) x0 + sqrt(1-a_prev) eps``.
* DPM-Solver++(2M), row ``(a_x, a_eps, c_x, c_d0, c_d1)``:
  ``x0 = a_x x + a_eps eps``; ``x = c_x x + c_d0 x0 + c_d1 x0_prev``.
"""

from __future__ import annotations

import os

import torch

SAMPLERS = {"ddim": 0, "dpmpp_2m": 1}

try:  # featinv imports without Triton; the reference below is used then
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def guided_update_reference(
    eps_pair: torch.Tensor,
    x: torch.Tensor,
    x0_prev: torch.Tensor | None,
    table: torch.Tensor,
    step: int,
    guidance_scale: float,
    sampler: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-PyTorch reference: (new x, data prediction x0), both float32, shape of ``x``.

    ``eps_pair`` (2B, ...) holds the unconditional branch first; ``table`` (steps, 5) float64.
    """
    u, c = eps_pair.float().chunk(2)
    eps = u + guidance_scale * (c - u)
    x = x.float()
    row = [float(v) for v in table[step]]
    if sampler == "ddim":
        sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction, _ = row
        x0 = (x - sqrt_beta * eps) / sqrt_alpha
        return sqrt_alpha_prev * x0 + direction * eps, x0
    a_x, a_eps, c_x, c_d0, c_d1 = row
    x0 = a_x * x + a_eps * eps
    out = c_x * x + c_d0 * x0
    if c_d1 != 0.0:
        out = out + c_d1 * x0_prev.float()
    return out, x0


if triton is not None:

    @triton.jit
    def _guided_update_kernel(
        eps_ptr,
        x_ptr,
        prev_ptr,
        out_x0_ptr,
        table_ptr,
        step_ptr,
        guidance,
        numel,
        SAMPLER: tl.constexpr,
        HAS_PREV: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        step = tl.load(step_ptr)
        row = table_ptr + step * 5
        k0 = tl.load(row).to(tl.float32)
        k1 = tl.load(row + 1).to(tl.float32)
        k2 = tl.load(row + 2).to(tl.float32)
        k3 = tl.load(row + 3).to(tl.float32)
        k4 = tl.load(row + 4).to(tl.float32)
        u = tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(eps_ptr + numel + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        eps = u + guidance * (c - u)
        if SAMPLER == 0:
            x0 = (x - k0 * eps) / k1
            new_x = k2 * x0 + k3 * eps
        else:
            x0 = k0 * x + k1 * eps
            new_x = k2 * x + k3 * x0
            if HAS_PREV:
                prev = tl.load(prev_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                new_x = new_x + k4 * prev
        tl.store(out_x0_ptr + offsets, x0, mask=mask)
        tl.store(x_ptr + offsets, new_x, mask=mask)


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run for tensors on ``device`` (CUDA, or the CPU interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def guided_update_(
    eps_pair: torch.Tensor,
    x: torch.Tensor,
    x0_prev: torch.Tensor | None,
    table: torch.Tensor,
    step: torch.Tensor,
    guidance_scale: float,
    sampler: str,
    out_x0: torch.Tensor | None = None,
    *,
    block: int = 1024,
    validate: bool = True,
) -> torch.Tensor:
    """Update ``x`` (B, ...) float32 in place; return this step's data prediction x0 (``out_x0`` if
    given, which must not alias ``x0_prev``). ``step`` is a device int tensor (0-d or (1,));
    ``table`` a (steps, 5) float64 tensor on ``x``'s device. Falls back to the reference where
    Triton cannot run. ``validate=False`` skips the check that reads the table on the host (needed
    inside CUDA graph capture; DPM++ callers then pass a zero ``x0_prev`` for the first step)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32 (the latents stay fp32), got {x.dtype}")
    if eps_pair.shape[0] != 2 * x.shape[0] or eps_pair.shape[1:] != x.shape[1:]:
        raise ValueError(f"eps_pair must be (2B, ...) for x (B, ...), got {tuple(eps_pair.shape)} and {tuple(x.shape)}")
    needs_prev = validate and sampler == "dpmpp_2m" and float(table[int(step)][4]) != 0.0
    if needs_prev and x0_prev is None:
        raise ValueError("this DPM-Solver++ step needs the previous data prediction x0_prev")
    out_x0 = out_x0 if out_x0 is not None else torch.empty_like(x)
    if not triton_available(x.device):
        new_x, x0 = guided_update_reference(eps_pair, x, x0_prev, table, int(step), guidance_scale, sampler)
        x.copy_(new_x)
        out_x0.copy_(x0)
        return out_x0
    target = x if x.is_contiguous() else x.contiguous()
    x0_target = out_x0 if out_x0.is_contiguous() else torch.empty_like(target)
    prev = x0_prev.contiguous() if x0_prev is not None else target
    numel = target.numel()
    grid = (triton.cdiv(numel, block),)
    _guided_update_kernel[grid](
        eps_pair.contiguous(),
        target,
        prev,
        x0_target,
        table.contiguous(),
        step.reshape(1),
        float(guidance_scale),
        numel,
        SAMPLER=SAMPLERS[sampler],
        HAS_PREV=x0_prev is not None and sampler == "dpmpp_2m",
        BLOCK=block,
    )
    if target is not x:
        x.copy_(target)
    if x0_target is not out_x0:
        out_x0.copy_(x0_target)
    return out_x0
