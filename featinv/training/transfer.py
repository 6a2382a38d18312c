"""Transfer of a trained FeatInv ControlNet to another classifier on the same base.

A new classifier's model starts from a trained model's ControlNet (the ``teacher``, e.g. the shipped
ConvNeXt inverter): its body is copied, and its hint encoder is trained to give, from the new
classifier's feature map of an image, the hint embedding the teacher gives from its own classifier's
map of the same image (MSE on the embeddings; the base and the ControlNet body are not run). Only the
hint encoder learns, so a step costs two classifier forwards and one hint encoder, not a diffusion
step; the ordinary ControlNet training (``featinv train --model``) then fine-tunes the whole
ControlNet from there. On the shapes models this takes a new classifier's inverter in minutes on a
CPU to where training from the base's copy took an hour of GPU (README, "Across architectures").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.training.loop import TrainConfig, TrainResult, fit

# The hint encoder's first convolution reads the classifier's channels: it is never copied.
NEW_CLASSIFIER_KEYS = ("hint_encoder.conv_in.",)


def check_transferable(model: FeatInvModel, teacher: FeatInvModel) -> None:
    """Refuse a teacher whose ControlNet cannot start ``model``'s: another base (fingerprint or
    sample shape), another ControlNet body, a distilled teacher, or the same feature spec (nothing to
    transfer: train or copy that model instead)."""
    if teacher.distillation is not None:
        raise FeatInvError("the model to transfer from (--transfer-from) is distilled: give the teacher's folder")
    if model.base_fingerprint is None or model.base_fingerprint != teacher.base_fingerprint:
        raise FeatInvError(
            "the model to transfer from (--transfer-from) must be made on the same base as this one "
            f"(its base fingerprint {teacher.base_fingerprint}, this model's {model.base_fingerprint})"
        )
    if teacher.latent_shape != model.latent_shape or teacher.image_size != model.image_size:
        raise FeatInvError(
            f"the model to transfer from samples {teacher.latent_shape} latents of {teacher.image_size} images, "
            f"this one {model.latent_shape} of {model.image_size}: they must match"
        )
    theirs, ours = _body(teacher), _body(model)
    if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in ours.items()}:
        raise FeatInvError(
            "the model to transfer from has another ControlNet architecture (create this model with the "
            "same base and --hint-channels as it)"
        )
    if teacher.feature_spec == model.feature_spec:
        raise FeatInvError("the model to transfer from inverts the same features: train this model directly")


def _body(model: FeatInvModel) -> dict[str, torch.Tensor]:
    """The ControlNet's weights that do not depend on the classifier."""
    return {k: v for k, v in model.controlnet.state_dict().items() if not k.startswith(NEW_CLASSIFIER_KEYS)}


def transfer_controlnet(
    model: FeatInvModel,
    extractor: FeatureExtractor,
    teacher: FeatInvModel,
    stream: ShapesStream,
    config: TrainConfig,
    *,
    teacher_extractor: FeatureExtractor | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Start ``model``'s ControlNet from ``teacher``'s and train its hint encoder in place so that
    ``model.controlnet.embed(extractor(x))`` matches ``teacher.controlnet.embed(teacher_extractor(x))``
    (both (B, C0, H, W)) on the stream's images x (B, 3, S, S), flipped as in training. Batch k is a
    pure function of (the stream's seed, k): ``resume`` continues exactly (the body is copied again,
    the hint encoder restored). ``teacher_extractor``: the teacher's maps (its own classifier when
    None). ``trainer_kwargs``: ``checkpoint_dir``, ``log_path``, ``resume``, ``after_step``, ``name``."""
    check_transferable(model, teacher)
    teacher_extractor = teacher.classifier if teacher_extractor is None else teacher_extractor
    model.controlnet.load_state_dict(_body(teacher), strict=False)
    model.controlnet.requires_grad_(False)
    teacher.controlnet.eval().requires_grad_(False)
    extractor.eval().requires_grad_(False)
    teacher_extractor.eval().requires_grad_(False)
    device = model.context.device
    hint_encoder = model.controlnet.hint_encoder.requires_grad_(True)

    def loss_fn(module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        images, _ = stream.batch(key, config.batch_size)
        images = images[part].to(device)
        with torch.no_grad():
            target = teacher.controlnet.embed(teacher_extractor(images))
            maps = extractor(images)
        with config.autocast(device):
            embedding = module(maps)
        return F.mse_loss(embedding.float(), target.float())

    name = trainer_kwargs.pop("name", "transfer")
    result = fit(name, hint_encoder, loss_fn, config, **trainer_kwargs)
    hint_encoder.requires_grad_(False)
    return result
