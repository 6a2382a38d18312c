"""The optimisation baseline (Mahendran & Vedaldi, "Understanding deep image representations by
inverting them", CVPR 2015): gradient descent on the input image so that its feature map matches a
target, with an alpha-norm prior, a total-variation prior and jitter. Works on any timm classifier
and layer without training anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.limits import within


@dataclass(frozen=True)
class OptimizeConfig:
    """Loss = ||phi(x) - phi0||^2 / ||phi0||^2 + tv_weight * TV_beta(x) + alpha_weight * ||2x - 1||_alpha^alpha,
    (priors as means over pixels), Adam on x in [0, 1], each step on a random shift of up to
    ``jitter`` pixels. Jitter is off by default: on EfficientNet-Lite0's 4x4 penultimate map (128 px)
    a 2-pixel jitter dropped the final feature cosine from 0.97 to 0.24.

    ``downsample`` > 1 optimises an image of 1/downsample the side, bilinearly upsampled (fewer,
    smoother unknowns), and ``lr_decay`` decays the learning rate on a cosine to zero: at 224 px
    (EfficientNet-Lite0, 7x7 map) the defaults stall at cosine 0.5 after 300 steps, while
    :meth:`for_input` (both, 1000 steps at lr 0.02) reached 0.911, 0.918, 0.931 and 0.935 for
    seeds 0-3 (one CPU thread). The loss sits on a plateau, then falls, and when depends on the seed
    and even on the thread count: 800 steps at lr 0.03, the earlier setting, reached 0.855, 0.933
    and 0.724 for seeds 0-2; 1000 at 0.03 reached 0.933, -, 0.888; 1200 at 0.03, 0.947 and 0.867."""

    steps: int = 300
    lr: float = 0.02
    tv_weight: float = 0.01
    tv_beta: float = 2.0
    alpha_weight: float = 1e-4
    alpha: float = 6.0
    jitter: int = 0
    downsample: int = 1
    lr_decay: bool = False

    def __post_init__(self) -> None:
        within("opt_steps", self.steps, "steps")
        if self.steps < 1 or self.lr <= 0 or self.jitter < 0 or self.downsample < 1:
            raise FeatInvError(
                f"steps must be >= 1, lr > 0, jitter >= 0 and downsample >= 1, got {self.steps}, {self.lr}, "
                f"{self.jitter}, {self.downsample}"
            )

    @classmethod
    def for_input(cls, side: int, steps: int | None = None) -> OptimizeConfig:
        """Settings for images of ``side`` pixels: the defaults up to 160 px; above, a half-resolution
        image, 1000 steps at lr 0.02 with cosine decay (chosen on scikit-image's cat at 224 px, four
        seeds)."""
        if side <= 160:
            return cls(steps=steps or cls.steps)
        return cls(steps=steps or 1000, lr=0.02, downsample=2, lr_decay=True)

    @classmethod
    def for_extractor(cls, extractor: FeatureExtractor, steps: int | None = None) -> OptimizeConfig:
        """:meth:`for_input` at the classifier's input side: the one setting of the baseline that
        ``reconstruct --method optimize``, the studies and every analysis command use."""
        return cls.for_input(max(extractor.spec.input_size[1:]), steps)


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean of (dx^2 + dy^2)^(beta/2) over the image (B, 3, H, W) -> (B,)."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2) + 1e-8).pow(beta / 2).flatten(1).mean(1)


def invert_by_optimization(
    extractor: FeatureExtractor,
    target: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
    config: OptimizeConfig = OptimizeConfig(),
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] whose feature maps match ``target`` (B, C, h, w).

    ``size`` is the image size to optimise (default: the classifier's input size).
    """
    extractor.spec.check_features(target)
    height, width = size if size is not None else extractor.spec.input_size[1:]
    device = next(extractor.classifier.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    low = (max(1, height // config.downsample), max(1, width // config.downsample))
    x = (0.5 + 0.05 * torch.randn(target.shape[0], 3, *low, generator=generator)).clamp(0, 1).to(device)
    x.requires_grad_(True)
    target = target.to(device, torch.float32)
    norm = target.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    optimizer = torch.optim.Adam([x], lr=config.lr)
    extractor.classifier.requires_grad_(False)

    def image() -> torch.Tensor:
        if low == (height, width):
            return x
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)

    for step in tqdm(range(config.steps), desc="optimising", disable=not progress, leave=False):
        if config.lr_decay:
            optimizer.param_groups[0]["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        dy, dx = (
            torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator).tolist()
            if config.jitter
            else (0, 0)
        )
        full = image()
        shifted = torch.roll(full, shifts=(dy, dx), dims=(2, 3))
        features = extractor._features(extractor.normalize(shifted.clamp(0, 1)))
        if extractor.spec.mode == "pooled":
            features = features.mean((2, 3), keepdim=True).expand_as(features)
        match = (features - target).flatten(1).pow(2).sum(1) / norm
        prior = config.tv_weight * total_variation(full, config.tv_beta)
        prior = prior + config.alpha_weight * (2 * full - 1).abs().pow(config.alpha).flatten(1).mean(1)
        loss = (match + prior).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.no_grad():
        return image().clamp(0, 1).detach().cpu()
