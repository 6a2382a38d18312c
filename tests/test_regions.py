"""The explorer's map edits (featinv.analysis.regions) and the map's pictures
(featinv.analysis.map_view): what each operation does inside and outside the painted cells, and
colours that are fixed per palette."""

from __future__ import annotations

import pytest
import torch

from featinv.analysis.map_view import MapPalette
from featinv.analysis.regions import MapEdit, apply_edit, cell_mask
from featinv.analysis.steering import Concept
from featinv.errors import FeatInvError

A = torch.rand(1, 6, 3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
B = torch.rand(1, 6, 3, 4, generator=torch.Generator().manual_seed(1))
CELLS = ((0, 1), (2, 3))
INSIDE = cell_mask(CELLS, (3, 4)).bool()


def test_each_operation_changes_the_painted_cells_only():
    mean_map = torch.full((1, 6, 3, 4), 0.25)
    for operation, inside in (("zero", torch.zeros_like(A)), ("mean", mean_map), ("paste", B)):
        edited = apply_edit(A, MapEdit(cells=CELLS, operation=operation), other=B, mean_map=mean_map)
        assert torch.equal(edited[..., INSIDE], inside[..., INSIDE]), operation
        assert torch.equal(edited[..., ~INSIDE], A[..., ~INSIDE]), operation
    every_cell = tuple((r, c) for r in range(3) for c in range(4))
    assert torch.equal(apply_edit(A, MapEdit(cells=every_cell, operation="paste"), other=B), B)  # B exactly

    concept = Concept(torch.nn.functional.normalize(torch.ones(6), dim=0), "up")
    steered = apply_edit(A, MapEdit(strength=0.5, cells=CELLS), concept=concept)
    assert not torch.equal(steered[..., INSIDE], A[..., INSIDE]) and torch.equal(steered[..., ~INSIDE], A[..., ~INSIDE])
    everywhere = apply_edit(A, MapEdit(strength=0.5), concept=concept)
    assert not torch.equal(everywhere[..., ~INSIDE], A[..., ~INSIDE])
    assert torch.allclose(apply_edit(A, MapEdit(mix=0.5), other=B), (A + B) / 2)
    assert not MapEdit(cells=CELLS).is_regional and MapEdit(cells=CELLS, operation="zero").is_regional


def test_bad_edits_say_what_is_wrong():
    for make, message in (
        (lambda: MapEdit(operation="blur"), "operation must be one of steer, zero, mean, paste"),
        (lambda: MapEdit(mix=1.5), "mix must be in [0, 1]"),
        (lambda: apply_edit(A, MapEdit(cells=((3, 0),), operation="zero")), "cell (3, 0) is off the 3x4 grid"),
        (lambda: apply_edit(A, MapEdit(cells=CELLS, operation="paste")), "paste needs a second image"),
        (lambda: apply_edit(A, MapEdit(cells=CELLS, operation="mean")), "the mean operation needs example images"),
        (lambda: apply_edit(A, MapEdit(strength=1.0)), "steering needs a concept"),
    ):
        with pytest.raises(FeatInvError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            make()


def test_the_palette_fixes_the_colours_and_the_norm():
    maps = torch.randn(5, 6, 3, 4, generator=torch.Generator().manual_seed(2))
    palette = MapPalette.fit(maps)
    rgb, norm = palette.rgb(maps[:1]), palette.norm(maps[:1])
    assert rgb.shape == (1, 3, 3, 4) and norm.shape == (1, 1, 3, 4)
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1 and 0 <= float(norm.min()) and float(norm.max()) <= 1
    assert torch.equal(MapPalette.fit(maps).rgb(maps[:1]), rgb)  # fitted again: the same colours
    torch.testing.assert_close(palette.rgb(maps[:2])[:1], rgb, rtol=0, atol=1e-6)  # not on the batch either
    torch.testing.assert_close(palette.mean_map, maps.mean(0, keepdim=True))
    with pytest.raises(FeatInvError, match=r"features must have shape \(B, 6, h, w\)"):
        palette.rgb(torch.zeros(1, 5, 3, 4))
