"""The shipped inverters of each classifier family (featinv.paths.ARCHITECTURES) on the one shared base,
and ``featinv demo --classifier``: each loads, inverts its own classifier's features and
reconstructs; the cross-architecture run writes its table, JSON and grid."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from featinv.data.shapes import generate_shapes
from featinv.models import FeatInvModel
from featinv.paths import ARCHITECTURES, BASE_DIR, PRETRAINED
from featinv.pipeline import Reconstructor

CLASSIFIERS = {"convnext": "convnext_atto", "resnet": "resnet18", "vit": "vit_tiny_r_s16_p8_224"}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_each_shipped_inverter_loads_matches_its_classifier_and_reconstructs(family):
    images = generate_shapes(2, seed=7).images
    for folder, mode in zip(ARCHITECTURES[family], ("spatial", "pooled"), strict=True):
        model = FeatInvModel.from_pretrained(PRETRAINED / folder)
        spec = model.feature_spec
        assert spec.model == CLASSIFIERS[family] and spec.mode == mode
        assert model.classifier is not None and model.classifier.spec.same_source(spec)
        assert model.base == str((PRETRAINED / BASE_DIR).resolve()) and not (PRETRAINED / folder / "unet").exists()
        maps = model.classifier(images)
        assert maps.shape == (2, *spec.shape)
        result = Reconstructor(model).reconstruct(images, steps=2, seed=0)
        assert result.images.shape == images.shape and torch.isfinite(result.images).all()


def test_the_shipped_spatial_maps_are_about_eight_by_eight():
    shapes = {
        family: FeatInvModel.from_pretrained(PRETRAINED / ARCHITECTURES[family][0]).feature_spec.shape
        for family in ARCHITECTURES
    }
    assert all(shape[1:] == (8, 8) for shape in shapes.values()), shapes


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_demo_for_every_classifier_writes_the_cross_architecture_table(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--classifier", "all", "--n", 2, "--steps", 2, "--out", tmp_path)
    assert code == 0, err
    for name in CLASSIFIERS.values():
        assert name in out
    assert "spatial - pooled" in out and "grid.png" in out
    results = json.loads((tmp_path / "architectures.json").read_text())
    assert set(ARCHITECTURES) <= set(results)
    for family in ARCHITECTURES:
        assert (tmp_path / family / "metrics.json").is_file()
        assert results[family]["classifier"].startswith(CLASSIFIERS[family])
        for name, mean in results[family]["spatial"].items():
            low, high = results[family]["ci95"]["spatial"][name]
            assert low <= mean <= high
    from PIL import Image

    side = 32 * 4 + 2  # each picture at 4x with its padding
    columns = 1 + len(ARCHITECTURES)  # the original, then each family's spatial reconstruction
    assert Image.open(tmp_path / "grid.png").size == (columns * side + 2, 2 * side + 2)
    code, _, err = run_cli(capsys, "demo", "--classifier", "resnet", "--realtime", "--n", 2, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--realtime goes with --classifier convnext only")
    code, _, err = run_cli(capsys, "demo", "--classifier", "all", "--realtime", "--n", 2, "--out", tmp_path / "y")
    assert_one_line_error(code, err, "--realtime goes with --classifier convnext only, got 'all'")
    assert not (tmp_path / "y").exists()  # refused before any model is loaded
