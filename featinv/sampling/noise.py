"""Seeded Gaussian noise, one generator per sample so results do not depend on batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int], generator: Generators, *, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...).

    Args:
        generator: one generator for the batch, or a list of B generators (sample i draws from
            generator i). Noise is drawn on each generator's device, then moved to ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"generator list has {len(generator)} entries, expected one per sample ({shape[0]})")
    parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.cat(parts).to(device)
