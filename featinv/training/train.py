"""Trainers for the built-in default: the demo classifier, the base diffusion UNet and the FeatInv
ControlNet (base frozen), all through :class:`featinv.training.loop.Trainer`. Data is procedural
(``shapes``): batch k is a pure function of (seed, k), and so are its noise, timesteps and dropout."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from featinv.analysis.metrics import feature_cosine
from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError, require_positive_int
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.training.loop import TrainConfig, Trainer, TrainResult

CONDITION_DROPOUT = 0.15


class OnlineFeatures:
    """Feature maps computed in the loop, batched on the device, by the frozen classifier."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)


class CachedFeatures:
    """Feature maps read from a cache made once by :func:`featinv.training.feature_cache.build_cache`:
    ``features`` (N, 2, C, h, w) for each pool image, unflipped and flipped."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, images: torch.Tensor, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        rows = self.features[index.to(self.features.device), flips.long().to(self.features.device)]
        return rows.to(images.device, torch.float32)


FeatureSource = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(images, pool indices, flips) -> feature maps (B, C, h, w)."""


def _alphas(model: FeatInvModel, device: torch.device) -> torch.Tensor:
    """The training alpha-bar table (num_train_timesteps,) as float32 on ``device``."""
    return torch.tensor(model.noise_schedule.alphas_cumprod(), dtype=torch.float32, device=device)


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
        return F.cross_entropy(module(extractor.preprocess(images[part])), labels[part])

    result = _fit("classifier", classifier, loss_fn, config, **trainer_kwargs)
    classifier.requires_grad_(False)
    return result


def train_base(
    model: FeatInvModel, stream: ShapesStream, config: TrainConfig, *, seed: int = 0, **trainer_kwargs: Any
) -> TrainResult:
    """Noise-prediction training of the base UNet with the stored context (an unconditional model)."""
    unet = model.unet.requires_grad_(True)
    alphas = _alphas(model, model.context.device)

    def loss_fn(module: torch.nn.Module, key: int, part: slice) -> torch.Tensor:
        images, _ = stream.batch(key, config.batch_size)
        images = images.to(model.context.device)
        x_t, t, noise, _ = _noisy(model, alphas, images, key, seed)
        x_t, t, noise = x_t[part], t[part], noise[part]
        context = model.context.expand(len(x_t), -1, -1)
        with config.autocast(x_t.device):
            eps = module(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
        return F.mse_loss(eps.float(), noise)

    result = _fit("base", unet, loss_fn, config, **trainer_kwargs)
    unet.requires_grad_(False)
    return result


def train_controlnet(
    model: FeatInvModel,
    features: FeatureSource,
    stream: ShapesStream,
    config: TrainConfig,
    *,
    seed: int = 0,
    consistency: Consistency | None = None,
    gradient_checkpointing: bool = False,
    **trainer_kwargs: Any,
) -> TrainResult:
    """FeatInv ControlNet training with the base frozen; ``features`` online or cached. 15% condition
    dropout: the zero feature map with the null context, as sampling's unconditional branch.
    ``consistency``: add the feature-consistency loss (see :class:`Consistency`).
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
    alphas = _alphas(model, model.context.device)
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
            hint = _unwrap(module).embed(maps)
            eps = model.predict_noise(x_t, t, context, hint, controlnet=module)
        loss = F.mse_loss(eps.float(), noise)
        if consistency is not None:
            loss = loss + consistency.loss(model, alphas, x_t, t, eps.float(), maps, ~drop)
        return loss

    name = trainer_kwargs.pop("name", "controlnet")
    result = _fit(name, controlnet, loss_fn, config, **trainer_kwargs)
    controlnet.requires_grad_(False)
    return result


@dataclass(frozen=True)
class Consistency:
    """Feature-consistency loss for ControlNet training (as ControlNet++, Li et al. 2024): the one-step
    clean estimate x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) of each conditioned sample with
    t < ``max_timestep`` goes through the frozen ``extractor``, and ``weight * (1 - cosine)`` between
    its feature map and the conditioning map is added to the noise-prediction loss. It trains the
    ControlNet to produce images whose features match the condition, the quantity FeatInv is judged by;
    at large t the one-step estimate is a blur, hence the cut-off."""

    extractor: FeatureExtractor
    weight: float = 0.1
    max_timestep: int = 400

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise FeatInvError(f"consistency weight (--consistency-weight) must be > 0, got {self.weight!r}")
        require_positive_int("consistency max_timestep (--consistency-max-t)", self.max_timestep)

    def loss(
        self,
        model: FeatInvModel,
        alphas: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        maps: torch.Tensor,
        conditioned: torch.Tensor,
    ) -> torch.Tensor:
        """Scalar loss for a batch: x_t, eps (B, C, H, W), t (B,), maps (B, C', h, w), conditioned (B,)."""
        keep = (conditioned & (t < self.max_timestep)).nonzero().flatten()
        if len(keep) == 0:
            return x_t.new_zeros(())
        a = alphas[t[keep]].view(-1, 1, 1, 1)
        x0 = (x_t[keep] - (1 - a).sqrt() * eps[keep]) / a.sqrt()
        return self.of_samples(model, x0, maps[keep])

    def of_samples(self, model: FeatInvModel, x0: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``weight * (1 - cosine)`` between the feature maps of the images clean samples x0
        (B, C, H, W) decode to and the conditioning maps (B, C', h, w), averaged."""
        rebuilt = self.extractor.forward_normalized(self.extractor.normalize(model.decode(x0)))
        return self.weight * (1 - feature_cosine(rebuilt.float(), maps.float())).mean()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (hint embedding runs outside the wrapped forward)."""
    return getattr(module, "module", module)


def _fit(
    name: str,
    module: torch.nn.Module,
    loss_fn: Any,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    resume: bool = False,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    trainer = Trainer(
        name, module, loss_fn, config, checkpoint_dir=checkpoint_dir, log_path=log_path, after_step=after_step
    )
    return trainer.fit(resume=resume)


def loss_curve_png(log_path: Path, out: Path) -> None:
    """Plot the JSONL log's losses per stage (log scale). Steps logged twice, by a run that was
    interrupted and resumed from an earlier checkpoint, are plotted once (the resumed value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: dict[str, dict[int, float]] = {}
    for line in log_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            stages.setdefault(row["stage"], {})[row["step"]] = row["loss"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, (stage, points) in zip(axes[0], stages.items(), strict=True):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
