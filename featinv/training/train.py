"""Trainers for the built-in default: the demo classifier, the base diffusion UNet and the FeatInv
ControlNet (base frozen), all through :class:`featinv.training.loop.Trainer`. Data is procedural
(``shapes``): batch k is a pure function of (seed, k), and so are its noise, timesteps and dropout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from featinv.data.streams import ShapesStream
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.sources.base import as_logits
from featinv.training.feature_cache import FeatureSource
from featinv.training.loop import TrainConfig, TrainResult, alphas_table, fit, unwrap
from featinv.training.losses import FeatureConsistencyLoss

CONDITION_DROPOUT = 0.15


def _noisy(
    model: FeatInvModel, alphas: torch.Tensor, images: torch.Tensor, key: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """x_t, t, the noise and the batch's generator for the clean ``images`` of batch ``key``."""
    g = torch.Generator().manual_seed(seed * 104_729 + key)
    device = images.device
    x0 = model.encode(images)
    t = torch.randint(0, model.noise_schedule.num_train_timesteps, (len(x0),), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, g


def train_classifier(
    extractor: FeatureExtractor, stream: ShapesStream, config: TrainConfig, **trainer_kwargs: Any
) -> TrainResult:
    """Cross-entropy training of the extractor's classifier on shapes labels.
    ``trainer_kwargs``: ``checkpoint_dir``, ``log_path``, ``resume``."""
    classifier = extractor.classifier.requires_grad_(True)
    device = next(classifier.parameters()).device

    def loss_fn(module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        images, labels = stream.batch(key, config.batch_size)
        images, labels = images.to(device), labels.to(device)
        return F.cross_entropy(as_logits(module(extractor.preprocess(images[part]))), labels[part])

    result = fit("classifier", classifier, loss_fn, config, **trainer_kwargs)
    classifier.requires_grad_(False)
    return result


def train_base(
    model: FeatInvModel, stream: ShapesStream, config: TrainConfig, *, seed: int = 0, **trainer_kwargs: Any
) -> TrainResult:
    """Noise-prediction training of the base UNet with the stored context (an unconditional model)."""
    unet = model.unet.requires_grad_(True)
    alphas = alphas_table(model, model.context.device)

    def loss_fn(module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        images, _ = stream.batch(key, config.batch_size)
        images = images.to(model.context.device)
        x_t, t, noise, _ = _noisy(model, alphas, images, key, seed)
        x_t, t, noise = x_t[part], t[part], noise[part]
        context = model.context.expand(len(x_t), -1, -1)
        with config.autocast(x_t.device):
            eps = module(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
        return F.mse_loss(eps.float(), noise)

    result = fit("base", unet, loss_fn, config, **trainer_kwargs)
    unet.requires_grad_(False)
    return result


def train_controlnet(
    model: FeatInvModel,
    features: FeatureSource,
    stream: ShapesStream,
    config: TrainConfig,
    *,
    seed: int = 0,
    consistency: FeatureConsistencyLoss | None = None,
    gradient_checkpointing: bool = False,
    **trainer_kwargs: Any,
) -> TrainResult:
    """FeatInv ControlNet training with the base frozen; ``features`` online or cached. 15% condition
    dropout: the zero feature map with the null context, as sampling's unconditional branch.
    ``consistency``: add the feature-consistency loss (see :class:`FeatureConsistencyLoss`).
    ``gradient_checkpointing``: recompute the ControlNet's and the UNet's activations in the
    backward pass instead of keeping them (diffusers' checkpointing: less memory, ~30% more time).
    ``trainer_kwargs``: ``checkpoint_dir``, ``log_path``, ``resume``, ``after_step`` (e.g. a
    :class:`featinv.training.validation.Validation`), ``name``."""
    model.unet.eval().requires_grad_(False)
    controlnet = model.controlnet.requires_grad_(True)
    for part in (model.unet, controlnet.controlnet):
        if gradient_checkpointing:
            part.enable_gradient_checkpointing()
        elif part.is_gradient_checkpointing:
            part.disable_gradient_checkpointing()
    alphas = alphas_table(model, model.context.device)
    if consistency is not None:
        consistency.extractor.eval().requires_grad_(False)

    def loss_fn(module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        index, flips = stream.draw(key, config.batch_size)
        images, _ = stream.take(index, flips, key=key)
        images = images.to(model.context.device)
        x_t, t, noise, g = _noisy(model, alphas, images, key, seed)
        drop = (torch.rand(len(x_t), generator=g) < CONDITION_DROPOUT).to(x_t.device)
        index, flips, images, x_t, t, noise, drop = (v[part] for v in (index, flips, images, x_t, t, noise, drop))
        maps = features(images, index, flips)
        maps = torch.where(drop[:, None, None, None], torch.zeros_like(maps), maps)
        context = torch.where(drop[:, None, None], model.null_context, model.context)
        with config.autocast(x_t.device):
            hint = unwrap(module).embed(maps)
            eps = model.predict_noise(x_t, t, context, hint, controlnet=module)
        loss = F.mse_loss(eps.float(), noise)
        if consistency is not None:
            loss = loss + consistency.loss(model, alphas, x_t, t, eps.float(), maps, ~drop)
        return loss

    name = trainer_kwargs.pop("name", "controlnet")
    result = fit(name, controlnet, loss_fn, config, **trainer_kwargs)
    controlnet.requires_grad_(False)
    return result
