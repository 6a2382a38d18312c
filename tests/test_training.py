"""The built-in default: the shapes data, the trainers, and the demo on the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch

from featinv.data.shapes import CLASSES, generate_shapes
from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR


def test_shapes_are_deterministic_and_masks_cover_the_objects():
    a, b, c = generate_shapes(12, 5), generate_shapes(12, 5), generate_shapes(12, 6)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 32, 32) and a.masks.shape == (12, 1, 32, 32)
    assert set(a.labels.tolist()) <= set(range(len(CLASSES)))
    area = a.masks.flatten(1).mean(1)
    assert bool(((area > 0.01) & (area < 0.6)).all())


def test_demo_runs_on_the_shipped_weights(tmp_path):
    from featinv.demo import DemoOptions, run_demo

    config = json.loads((PRETRAINED / SPATIAL_DIR / "featinv.json").read_text())
    assert config["feature_spec"]["model"] == "convnext_atto"
    shipped = sum(p.stat().st_size for p in PRETRAINED.rglob("*.safetensors"))
    assert shipped <= 40 * 1024 * 1024  # issue 20: every shipped model, the base once
    metrics = run_demo(tmp_path, DemoOptions(device="cpu", n=6, steps=3))
    assert {p.name for p in tmp_path.iterdir()} == {"grid.png", "metrics.png", "metrics.json", "report.html"}
    assert metrics["spatial"]["feature_cosine"] > metrics["pooled"]["feature_cosine"]
    for mode in ("spatial", "pooled"):
        for name, mean in metrics[mode].items():
            low, high = metrics["ci95"][mode][name]
            assert low <= mean <= high, (mode, name)
    difference = metrics["spatial_minus_pooled"]["feature_cosine"]
    assert difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]
    assert "95% confidence interval" in (tmp_path / "report.html").read_text()


@pytest.mark.heavy
def test_the_shapes_demo_preset_trains_and_resumes_to_the_same_models(tmp_path):
    from featinv.models.featinv_model import FeatInvModel
    from featinv.training.demo_preset import POOLED_DIR, train_shapes_demo

    train_shapes_demo(tmp_path, scale=0.0004, checkpoint_every=1, batch_size=8)
    first = FeatInvModel.from_pretrained(tmp_path / SPATIAL_DIR).controlnet.state_dict()
    assert (tmp_path / POOLED_DIR / "featinv.json").is_file() and (tmp_path / "loss_curve.png").is_file()
    stages = {p.stem for p in (tmp_path / "stages").iterdir()}
    assert stages == {"classifier", "base", "controlnet-spatial", "controlnet-pooled"}
    # the base folder keeps the contexts its UNet was trained with, for models made on it later
    from featinv.training.demo_preset import BASE_DIR
    from featinv.weights import load_state_dict

    stored = load_state_dict(tmp_path / BASE_DIR / "contexts.safetensors")
    assert torch.equal(stored["context"], FeatInvModel.from_pretrained(tmp_path / SPATIAL_DIR).context)
    # Resuming a finished run loads every stage and rebuilds the same models.
    train_shapes_demo(tmp_path, scale=0.0004, checkpoint_every=1, batch_size=8, resume=True)
    again = FeatInvModel.from_pretrained(tmp_path / SPATIAL_DIR).controlnet.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
