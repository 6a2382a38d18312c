"""The ``shapes-demo`` preset: the built-in default's classifier, base model and FeatInv models,
and the command that trains them (``featinv train --preset shapes-demo``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from featinv.features import FeatureExtractor
from featinv.models.controlnet import FeatInvControlNet
from featinv.models.featinv_model import FeatInvModel
from featinv.training.train import ShapesStream, loss_curve_png, train_base, train_classifier, train_controlnet

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
SPATIAL_DIR, POOLED_DIR = "shapes-demo", "shapes-demo-pooled"
TRAIN_SEED = 1  # the held-out demo images use another seed (featinv.demo.DEMO_SEED)

CLASSIFIER = "convnext_atto"
CLASSIFIER_KWARGS = {"num_classes": 6, "dims": [24, 48, 96, 192], "depths": [1, 1, 2, 1], "output_stride": 8}
CLASSIFIER_INPUT = (3, 64, 64)  # 32 px shapes, upsampled: a 192x8x8 penultimate map
UNET = {
    "block_out_channels": (32, 64),
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "image_size": 32,
    "hint_channels": 64,
}
STEPS = {"classifier": 2000, "base": 8000, "controlnet": 5000}


def demo_extractor(mode: str = "spatial") -> FeatureExtractor:
    return FeatureExtractor(CLASSIFIER, mode=mode, model_kwargs=CLASSIFIER_KWARGS, input_size=CLASSIFIER_INPUT)


def train_shapes_demo(
    out: str | Path, *, device: str = "cpu", scale: float = 1.0, time_budget_s: float | None = None
) -> None:
    """Train the classifier, the base UNet, and spatial and pooled FeatInv ControlNets; write both
    model folders into ``out``. ``scale`` multiplies the step counts (tests use a tiny one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    log.unlink(missing_ok=True)
    device = torch.device(device)
    torch.manual_seed(TRAIN_SEED)
    start = time.perf_counter()
    budget = (lambda share: None) if time_budget_s is None else (lambda share: share * time_budget_s)
    steps = {k: max(1, int(v * scale)) for k, v in STEPS.items()}
    stream = ShapesStream(pool_size=max(256, int(50_000 * min(scale, 1.0))), seed=TRAIN_SEED, device=device)

    extractor = demo_extractor().to(device)
    train_classifier(extractor, stream, steps["classifier"], log_path=log, time_budget_s=budget(0.1))
    model = FeatInvModel.from_preset("tiny", extractor, seed=TRAIN_SEED, **UNET).to(device)
    train_base(model, stream, steps["base"], seed=TRAIN_SEED, log_path=log, time_budget_s=budget(0.4))
    # The ControlNet copies the encoder of the base as trained, not as initialised.
    fresh = FeatInvControlNet.from_unet(model.unet, extractor.spec.channels, hint_channels=UNET["hint_channels"])
    model.controlnet.load_state_dict(fresh.state_dict())
    train_controlnet(
        model,
        extractor,
        stream,
        steps["controlnet"],
        seed=TRAIN_SEED,
        log_path=log,
        time_budget_s=budget(0.25),
        name="controlnet-spatial",
    )
    model.to("cpu").save_pretrained(out / SPATIAL_DIR)

    pooled_extractor = demo_extractor("pooled").to(device)
    pooled_extractor.classifier.load_state_dict(extractor.classifier.state_dict())
    model.to(device).controlnet.load_state_dict(fresh.to(device).state_dict())
    train_controlnet(
        model,
        pooled_extractor,
        stream,
        steps["controlnet"],
        seed=TRAIN_SEED + 1,
        log_path=log,
        time_budget_s=budget(0.25),
        name="controlnet-pooled",
    )
    pooled = FeatInvModel(
        model.unet,
        model.controlnet,
        pooled_extractor.spec,
        model.context,
        model.null_context,
        noise_schedule=model.noise_schedule,
        classifier=pooled_extractor,
    )
    pooled.to("cpu").save_pretrained(out / POOLED_DIR)
    loss_curve_png(log, out / "loss_curve.png")
    print(f"trained shapes-demo in {time.perf_counter() - start:.0f} s on {device}; wrote {out}")
