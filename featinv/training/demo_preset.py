"""The ``shapes-demo`` preset: the built-in default's classifier, base model and FeatInv models,
and the command that trains them (``featinv train --preset shapes-demo``)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from featinv.data.shapes import CLASSES, TRAIN_SEED
from featinv.data.streams import ShapesStream
from featinv.distributed import get_accelerator
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.limits import within
from featinv.models.controlnet import FeatInvControlNet
from featinv.models.featinv_model import FeatInvModel
from featinv.paths import BASE_DIR, POOLED_DIR, PRETRAINED, SPATIAL_DIR  # noqa: F401  (re-exported)
from featinv.training.feature_cache import OnlineFeatures, load_cache
from featinv.training.loop import TrainConfig, TrainResult, loss_curve_png
from featinv.training.train import train_base, train_classifier, train_controlnet
from featinv.weights import load_state_dict, save_state_dict_atomic

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
STAGES = {
    "classifier": TrainConfig(steps=2000, lr=3e-3, batch_size=256),
    "base": TrainConfig(steps=8000, lr=1e-3, batch_size=128),
    "controlnet": TrainConfig(steps=5000, lr=5e-4, batch_size=128),
}
BUDGET_SHARES = {"classifier": 0.1, "base": 0.4, "controlnet-spatial": 0.25, "controlnet-pooled": 0.25}


def demo_extractor(mode: str = "spatial") -> FeatureExtractor:
    return FeatureExtractor(CLASSIFIER, mode=mode, model_kwargs=CLASSIFIER_KWARGS, input_size=CLASSIFIER_INPUT)


def train_shapes_demo(
    out: str | Path,
    *,
    device: str = "cpu",
    scale: float = 1.0,
    time_budget_s: float | None = None,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    resume: bool = False,
    grad_accum: int = 1,
    ema_decay: float | None = None,
    features_cache: str | Path | None = None,
    batch_size: int | None = None,
    mixed_precision: str = "auto",
) -> None:
    """Train the classifier, the base UNet, and spatial and pooled FeatInv ControlNets; write both
    model folders into ``out``. ``scale`` multiplies the step counts and ``batch_size`` replaces
    every stage's batch (tests use tiny ones).

    Each stage checkpoints into ``out/checkpoints/<stage>/`` every ``checkpoint_every`` steps and,
    when done, writes ``out/stages/<stage>.safetensors``; ``resume`` skips finished stages and
    continues the interrupted one from its newest good checkpoint (the newest ``keep_checkpoints`` of
    each stage are kept; 0: all). Under ``accelerate launch`` or
    ``torchrun`` every stage runs data-parallel (DDP). ``features_cache``: a cache of the spatial
    classifier's features for this pool (``featinv features cache``), used instead of online features.
    """
    out = Path(out)
    accelerator = get_accelerator(device)
    device = accelerator.device
    within("scale", scale, "scale")
    torch.manual_seed(TRAIN_SEED)
    stream = ShapesStream(pool_size=max(256, int(50_000 * min(scale, 1.0))), seed=TRAIN_SEED, device=device)
    extractor = demo_extractor().to(device)
    spatial_features = (  # a cache that does not fit is refused here, before anything is written
        OnlineFeatures(extractor) if features_cache is None else load_cache(features_cache, extractor, stream)
    )
    log = out / "train_log.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            log.unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "stages", ignore_errors=True)
    accelerator.wait_for_everyone()
    start = time.perf_counter()

    def config(stage: str, base: str) -> TrainConfig:
        budget = None if time_budget_s is None else BUDGET_SHARES[stage] * time_budget_s
        return replace(
            STAGES[base],
            steps=max(1, int(STAGES[base].steps * scale)),
            time_budget_s=budget,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            grad_accum=grad_accum,
            ema_decay=ema_decay if base != "classifier" else None,
            batch_size=batch_size or STAGES[base].batch_size,
            mixed_precision=mixed_precision,
        )

    def stage(name: str, module: torch.nn.Module, run: Callable[..., TrainResult]) -> None:
        """Run a stage unless it finished before (then load its weights)."""
        done = out / "stages" / f"{name}.safetensors"
        if resume and done.is_file():
            module.load_state_dict(load_state_dict(done, what=f"{name} stage weights"))
            print(f"{name}: finished before, loaded {done}")
            return
        result = run(checkpoint_dir=out / "checkpoints" / name, log_path=log, resume=resume)
        # A stage cut short by its share of the time budget is final too (a quick, shorter run).
        if not (result.finished or time_budget_s is not None):
            raise FeatInvError(f"{name} stopped at step {result.steps_done}; continue with --resume")
        if accelerator.is_main_process:
            save_state_dict_atomic(module.state_dict(), done)
        accelerator.wait_for_everyone()

    stage(
        "classifier",
        extractor.classifier,
        partial(train_classifier, extractor, stream, config("classifier", "classifier")),
    )
    model = FeatInvModel.from_preset("tiny", extractor, seed=TRAIN_SEED, **UNET).to(device)
    model.class_names = list(CLASSES)
    stage("base", model.unet, partial(train_base, model, stream, config("base", "base"), seed=TRAIN_SEED))
    # The ControlNet copies the encoder of the base as trained, not as initialised.
    fresh = FeatInvControlNet.from_unet(model.unet, extractor.spec.channels, hint_channels=UNET["hint_channels"])
    model.controlnet.load_state_dict(fresh.state_dict())
    spatial_config = config("controlnet-spatial", "controlnet")
    run = partial(train_controlnet, model, spatial_features, stream, spatial_config, seed=TRAIN_SEED)
    stage("controlnet-spatial", model.controlnet, partial(run, name="controlnet-spatial"))
    if accelerator.is_main_process:
        model.to("cpu").save_base(out / BASE_DIR)
        model.save_pretrained(out / SPATIAL_DIR)
        model.to(device)

    pooled_extractor = demo_extractor("pooled").to(device)
    pooled_extractor.classifier.load_state_dict(extractor.classifier.state_dict())
    model.controlnet.load_state_dict(fresh.to(device).state_dict())
    pooled_config = config("controlnet-pooled", "controlnet")
    run = partial(train_controlnet, model, OnlineFeatures(pooled_extractor), stream, pooled_config, seed=TRAIN_SEED + 1)
    stage("controlnet-pooled", model.controlnet, partial(run, name="controlnet-pooled"))
    if accelerator.is_main_process:
        pooled = FeatInvModel(
            model.unet,
            model.controlnet,
            pooled_extractor.spec,
            model.context,
            model.null_context,
            noise_schedule=model.noise_schedule,
            classifier=pooled_extractor,
            base=model.base,
            base_fingerprint=model.base_fingerprint,
            class_names=model.class_names,
        )
        pooled.to("cpu").save_pretrained(out / POOLED_DIR)
        loss_curve_png(log, out / "loss_curve.png")
        print(f"trained shapes-demo in {time.perf_counter() - start:.0f} s on {device}; wrote {out}")
    accelerator.wait_for_everyone()
