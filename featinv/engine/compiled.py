"""The compiled backend: the denoiser graph (ControlNet + UNet + injection) through torch.compile.

The timestep is a tensor input, so one compiled graph serves every step (a Python int would be
specialised and recompiled per value). On CUDA the default mode is ``reduce-overhead`` (CUDA graphs
of the compiled step); on CPU ``default`` (Inductor's C++ kernels). One compiled graph per
(batch, dtype) shape, reused across reconstructions.
"""

from __future__ import annotations

import torch

from featinv.engine.compile_cache import own_compile_cache
from featinv.engine.export import DenoiserGraph
from featinv.errors import FeatInvError
from featinv.models.featinv_model import FeatInvModel

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledDenoiser:
    """A :class:`featinv.engine.base.Denoiser` running ``torch.compile(DenoiserGraph(model))``."""

    def __init__(self, model: FeatInvModel, mode: str | None = None) -> None:
        device = next(model.unet.parameters()).device
        mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        if mode not in MODES:
            raise FeatInvError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model, self.mode = model, mode
        graph = own_compile_cache(DenoiserGraph(model).eval())  # a variant per (batch, dtype), not shared
        self.graph = torch.compile(graph, mode=mode, dynamic=False, fullgraph=False)

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        dtype = self.model.unet.dtype
        t = torch.full((sample.shape[0],), int(timestep), dtype=torch.long, device=sample.device)
        eps = self.graph(sample.to(dtype), t, context.to(dtype).contiguous(), hint.to(dtype))
        # reduce-overhead returns CUDA-graph-owned memory that the next replay overwrites: copy it out.
        return eps.float().clone()
