"""Composition of feature maps: interpolate between two images' maps, mix them by a mask, keep or
remove channel groups. All take and return (B, C, h, w)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featinv.errors import FeatInvError


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise FeatInvError(
            f"feature maps to compose must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 - t) a + t b."""
    _check_pair(a, b)
    return torch.lerp(a, b, float(t))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of each flattened map, with the norm interpolated linearly."""
    _check_pair(a, b)
    fa, fb = a.flatten(1), b.flatten(1)
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    ua, ub = fa / na.clamp_min(1e-12), fb / nb.clamp_min(1e-12)
    omega = torch.acos((ua * ub).sum(1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    t = float(t)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    return (direction * ((1 - t) * na + t * nb)).view_as(a)


def mix_by_mask(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` (H, W) in [0, 1] is 0, ``b`` where it is 1 (area-resized to the map)."""
    _check_pair(a, b)
    if mask.ndim != 2:
        raise FeatInvError(f"mask must have shape (H, W), got {tuple(mask.shape)}")
    weight = F.interpolate(mask.float()[None, None], size=a.shape[-2:], mode="area").to(a)
    return a * (1 - weight) + b * weight


def select_channels(features: torch.Tensor, channels: list[int], *, keep: bool) -> torch.Tensor:
    """Zero every channel outside ``channels`` (``keep``) or inside them (remove)."""
    count = features.shape[1]
    bad = [c for c in channels if not 0 <= c < count]
    if bad:
        raise FeatInvError(f"channels must be in [0, {count - 1}], got {bad[:5]}")
    selected = torch.zeros(count, dtype=torch.bool, device=features.device)
    selected[channels] = True
    keep_mask = selected if keep else ~selected
    return features * keep_mask[None, :, None, None].to(features)
