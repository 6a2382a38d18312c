"""The fast path's pieces: a function of a module (the ControlNet, the UNet's encoder or decoder)
as a module for ``torch.compile``, run with weights prepared for speed without touching the model.

* Convolution weights as channels-last copies. Inductor runs convolutions channels-last; given the
  model's (N, C, H, W) weights it converts every weight on every call: at miniSD scale 819 M
  parameters, 3.3 GB of fp16 traffic and ~150 copy kernels per step. The copies cost that memory
  once instead (1.6 GB in fp16 at miniSD scale).
* Attention processors from ``featinv.engine.fast_attention`` (merged q/k/v projections, the fixed
  contexts' keys and values projected once) and the resnets' timestep projections as tables
  (``featinv.engine.time_tables``), swapped in for the call and restored after it.

All are a snapshot of the model when the piece is built: build the fast path again after changing
its weights or contexts. While a piece runs, the model's processors, time projections and
convolution weights are the piece's; captured in a CUDA graph, the piece's Python runs only at
capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from featinv.engine.compile_cache import own_compile_cache
from featinv.errors import FeatInvError


class ModuleCall(torch.nn.Module):
    """``fn(module, *args)`` as the forward of a module (what ``functional_call`` calls)."""

    def __init__(self, fn: Callable, module: torch.nn.Module) -> None:
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, *args):
        return self.fn(self.module, *args)


def channels_last_weights(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Channels-last copies of the 4-D (convolution) weights of ``module``, named ``prefix + name``."""
    return {
        prefix + name: weight.detach().to(memory_format=torch.channels_last)
        for name, weight in module.named_parameters()
        if weight.dim() == 4
    }


class Piece(torch.nn.Module):
    """``fn(module, *args)`` with other weights, attention processors and time projections.

    Args:
        fn: what to run, ``fn(module, *args)``; ``args[1]`` is the timestep (1,) or (B,) when
            ``clock`` is given.
        module: the model part it runs on.
        weights: parameter name (in ``module``) -> tensor to use instead (``channels_last_weights``;
            shared between pieces of one module).
        processors: attention module -> processor to use during the call (those inside ``module``).
        time_tables: resnet -> ``TimeProjectionTable`` to use as its ``time_emb_proj``.
        clock: the tables' clock; the piece sets its timestep.
        time_embeddings: model -> ``UnusedTimeEmbedding`` to use as its ``time_embedding`` (where
            the tables left the embedding no reader).
    """

    def __init__(
        self,
        fn: Callable,
        module: torch.nn.Module,
        *,
        weights: dict | None = None,
        processors: dict | None = None,
        time_tables: dict | None = None,
        clock=None,
        time_embeddings: dict | None = None,
    ) -> None:
        super().__init__()
        self.call = ModuleCall(fn, module)
        inside = set(module.modules())
        self.swaps = [(attn, "processor", proc) for attn, proc in (processors or {}).items() if attn in inside]
        self.swaps += [(res, "time_emb_proj", table) for res, table in (time_tables or {}).items() if res in inside]
        self.swaps += [(m, "time_embedding", stub) for m, stub in (time_embeddings or {}).items() if m in inside]
        if any(name == "time_emb_proj" for _, name, _ in self.swaps) and clock is None:
            raise FeatInvError("time tables need their clock")
        self.clock = clock
        self.weights = {f"module.{name}": weight for name, weight in (weights or {}).items()}
        own_compile_cache(self)  # three pieces per fast path, a variant per batch size each

    def forward(self, *args):
        if self.clock is not None:
            self.clock.timestep = args[1]
        saved = [getattr(owner, name) for owner, name, _ in self.swaps]
        try:
            for owner, name, replacement in self.swaps:
                setattr(owner, name, replacement)
            return self.run(*args)
        finally:
            for (owner, name, _), original in zip(self.swaps, saved, strict=True):
                setattr(owner, name, original)

    def run(self, *args):
        """``fn(module, *args)`` with the piece's weights (its swaps in place)."""
        if not self.weights:
            return self.call(*args)
        return functional_call(self.call, self.weights, args, strict=False)
