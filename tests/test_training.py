"""The built-in default: the shapes data, the trainers, and the demo on the shipped weights."""

from __future__ import annotations

import json

import torch
from conftest import make_model

from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR
from featinv.training.shapes import CLASSES, generate_shapes
from featinv.training.train import ShapesStream, train_base, train_controlnet


def test_shapes_are_deterministic_and_masks_cover_the_objects():
    a, b, c = generate_shapes(12, 5), generate_shapes(12, 5), generate_shapes(12, 6)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 32, 32) and a.masks.shape == (12, 1, 32, 32)
    assert set(a.labels.tolist()) <= set(range(len(CLASSES)))
    area = a.masks.flatten(1).mean(1)
    assert bool(((area > 0.01) & (area < 0.6)).all())


def test_a_few_training_steps_lower_the_loss(tiny_extractor):
    torch.manual_seed(0)
    model = make_model(tiny_extractor)
    stream = ShapesStream(pool_size=64, seed=3, device=torch.device("cpu"), size=16)
    base = train_base(model, stream, 40, batch_size=16, lr=3e-3, seed=0)
    assert base[-1] < base[0]
    control = train_controlnet(model, tiny_extractor, stream, 25, batch_size=8, lr=1e-3, seed=0)
    assert control[-1] < control[0]


def test_demo_runs_on_the_shipped_weights(tmp_path):
    from featinv.demo import run_demo

    config = json.loads((PRETRAINED / SPATIAL_DIR / "featinv.json").read_text())
    assert config["feature_spec"]["model"] == "convnext_atto"
    shipped = sum(p.stat().st_size for p in PRETRAINED.rglob("*.safetensors"))
    assert shipped <= 20 * 1024 * 1024
    metrics = run_demo(tmp_path, device="cpu", n=6, steps=3)
    assert {p.name for p in tmp_path.iterdir()} == {"grid.png", "metrics.json", "report.html"}
    assert metrics["spatial"]["feature_cosine"] > metrics["pooled"]["feature_cosine"]
