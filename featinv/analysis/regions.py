"""One image's feature map, edited as the explorer (the web page and the notebook widget) edits it:
moved toward a second image's map, steered along a concept, and changed in painted grid cells:
steered only there, ablated (zero, or the examples' mean map), or replaced by the second image's map
(the composite nature of the feature space, spatially).

Cells are (row, column) positions of the map's own grid (h, w), so an edit means the same at any
image size."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from featinv.analysis.compose import lerp, mix_by_mask
from featinv.analysis.steering import MAX_STRENGTH, Concept, steer
from featinv.choices import REGION_OPERATIONS
from featinv.errors import FeatInvError


@dataclass(frozen=True)
class MapEdit:
    """What to do to image A's map (B, C, h, w).

    Attributes:
        strength: steering along the concept, in units of the map's mean per-position norm.
        mix: 0 = A's map, 1 = the second image's (linear interpolation).
        cells: painted (row, column) cells of the (h, w) grid.
        operation: what happens in the painted cells (:data:`REGION_OPERATIONS`): ``steer`` (the
            steering acts there only; without cells, everywhere), ``zero``, ``mean`` (the examples'
            mean map) or ``paste`` (the second image's map).
    """

    strength: float = 0.0
    mix: float = 0.0
    cells: tuple[tuple[int, int], ...] = ()
    operation: str = "steer"

    def __post_init__(self) -> None:
        if not -MAX_STRENGTH <= float(self.strength) <= MAX_STRENGTH:
            raise FeatInvError(f"strength must be in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {self.strength}")
        if not 0.0 <= float(self.mix) <= 1.0:
            raise FeatInvError(f"mix must be in [0, 1], got {self.mix}")
        if self.operation not in REGION_OPERATIONS:
            raise FeatInvError(f"operation must be one of {', '.join(REGION_OPERATIONS)}, got {self.operation!r}")
        object.__setattr__(self, "cells", tuple(sorted({(int(r), int(c)) for r, c in self.cells})))

    @property
    def is_regional(self) -> bool:
        """Whether painted cells change the map (steering confined to them counts only when it steers)."""
        return bool(self.cells) and (self.operation != "steer" or self.strength != 0)


def cell_mask(cells: Iterable[tuple[int, int]], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) float mask, 1 in the painted cells; a FeatInvError for a cell off the grid."""
    height, width = grid
    mask = torch.zeros(height, width)
    for row, column in cells:
        if not (0 <= row < height and 0 <= column < width):
            raise FeatInvError(f"cell ({row}, {column}) is off the {height}x{width} grid of the feature map")
        mask[row, column] = 1.0
    return mask


def apply_edit(
    features: torch.Tensor,
    edit: MapEdit,
    *,
    concept: Concept | None = None,
    other: torch.Tensor | None = None,
    mean_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """A's map ``features`` (B, C, h, w) edited: toward ``other`` (B's map, same shape) by
    ``edit.mix``, steered along ``concept`` by ``edit.strength`` (inside the painted cells with the
    ``steer`` operation and cells, else everywhere), then the painted cells zeroed, set to
    ``mean_map`` (1, C, h, w) or replaced by ``other``."""
    moved = features
    if edit.mix > 0:
        if other is None:
            raise FeatInvError("mix needs a second image (B)")
        moved = lerp(moved, other, edit.mix)
    mask = cell_mask(edit.cells, tuple(features.shape[-2:])) if edit.cells else None
    if edit.strength != 0:
        if concept is None:
            raise FeatInvError("steering needs a concept (a class of the classifier's head, or a CAV)")
        confined = mask if edit.operation == "steer" else None
        moved = steer(moved, concept, [edit.strength], mask=confined)[0]
    if mask is None or edit.operation == "steer":
        return moved
    if edit.operation == "zero":
        replacement = torch.zeros_like(moved)
    elif edit.operation == "mean":
        if mean_map is None:
            raise FeatInvError("the mean operation needs example images (their mean map), and there are none")
        replacement = mean_map.to(moved).expand_as(moved)
    else:
        if other is None:
            raise FeatInvError("paste needs a second image (B)")
        replacement = other.to(moved)
    return mix_by_mask(moved, replacement, mask)
