"""The explorer's notebook face (featinv.notebook.Explorer, an anywidget), without a browser: setting
its state reconstructs and fills its picture traits, and a region edit through the widget equals the
same edit made with the library (featinv.analysis.regions and a Reconstructor)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

pytest.importorskip("anywidget")

from featinv.analysis.regions import MapEdit, apply_edit  # noqa: E402
from featinv.notebook import Explorer  # noqa: E402
from featinv.pipeline import Reconstructor  # noqa: E402

SEEDS = 2


@pytest.fixture
def pictures():
    """Three pictures at the micro model's own size (16 px), so that both ways see the same input."""
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def explorer(pictures):
    model = make_model()
    widget = Explorer(model, pictures[0], other=pictures[1], seeds=SEEDS, examples=pictures, device="cpu", steps=3)
    yield widget
    widget.close()


def test_setting_the_state_reconstructs_and_fills_the_pictures(explorer):
    first = explorer.wait()
    assert first.images.shape[0] == SEEDS and len(explorer.images) == SEEDS
    assert all(src.startswith("data:image/png;base64,") for src in explorer.images)
    assert explorer.image_a and explorer.image_b and explorer.map_picture and explorer.norm_picture
    assert explorer.grid == [2, 2] and explorer.difference == ""

    explorer.mix = 0.5  # as the slider does: a new reconstruction, other pictures
    moved = explorer.wait()
    assert moved is not first and not torch.equal(moved.images, first.images)
    assert "updated in" in explorer.status

    explorer.cells = [[0, 1]]
    explorer.operation = "zero"
    painted = explorer.wait()
    assert painted.unedited is not None and torch.equal(painted.unedited, moved.images)  # the pictures before
    assert explorer.difference.startswith("data:image/png")


@pytest.mark.parametrize("operation", ["zero", "mean", "paste"])
def test_a_region_edit_through_the_widget_equals_the_library(explorer, pictures, operation):
    cells = [(0, 0), (1, 1)]
    images = explorer.reconstruct(cells=cells, operation=operation, mix=0.25)

    reconstructor = Reconstructor(explorer.server.reconstructor.model)
    a, b = (reconstructor.features(pictures[i : i + 1]) for i in (0, 1))
    mean_map = reconstructor.features(pictures).mean(0, keepdim=True)  # the examples' mean map
    edited = apply_edit(a, MapEdit(mix=0.25, cells=cells, operation=operation), other=b, mean_map=mean_map)
    torch.testing.assert_close(explorer.edited_map, edited, rtol=0, atol=1e-6)
    server = explorer.server
    expected = reconstructor.reconstruct(
        features=edited.expand(SEEDS, -1, -1, -1),
        steps=server.steps,
        sampler=server.sampler,
        guidance_scale=server.guidance_scale,
        seed=0,
        progress=False,
    ).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_bad_state_is_one_clear_error(explorer):
    with pytest.raises(Exception, match="operation must be one of steer, zero, mean, paste"):
        explorer.reconstruct(operation="blur")
    with pytest.raises(Exception, match=r"cell \(5, 0\) is off the 2x2 grid"):
        explorer.cells = [[5, 0]]
    assert explorer.operation == "steer" and explorer.cells == []  # the state stays as it was
    with pytest.raises(Exception, match="reconstruct takes strength, mix, concept, cells and operation"):
        explorer.reconstruct(colour=1)
