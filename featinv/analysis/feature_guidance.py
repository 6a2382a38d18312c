"""Feature guidance: a denoiser's noise predictions steered toward images whose feature map matches
a target, shared by training-free guided sampling (:mod:`featinv.analysis.guided`, the base alone)
and hybrid sampling (:mod:`featinv.analysis.hybrid`, the FeatInv model's own denoiser).

At a guided step t the noise prediction gives the clean estimate
``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; its images (decoded by the VAE for latent models) go
through the frozen classifier, and the feature distance ``d(phi(decode(x0)), phi0)`` steers the step
in two ways, as in universal guidance (Bansal et al., CVPR-W 2023):

- forward guidance (their eq. 6): ``eps += strength * sqrt(1 - a_t) * g / rms(g)``, g the gradient of
  d with respect to x_t, through the denoiser, the decoder and the classifier;
- backward guidance (their sec. 3.2): ``inner_steps`` normalised gradient steps of d on x0 itself
  (no denoiser in the backward pass), the step then continuing from the moved x0 with the noise
  ``eps' = (x_t - sqrt(a_t) x0') / sqrt(1 - a_t)`` it implies.

Every sampler of featinv (DDIM, DPM-Solver++, the LCM rows) reads eps this way, so one wrapper
serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from featinv.choices import DISTANCES
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.limits import within
from featinv.sampling.guidance import Denoise


def feature_distance(features: torch.Tensor, target: torch.Tensor, distance: str, pooled: bool) -> torch.Tensor:
    """Per-image distance (B,) between feature maps (B, C, h, w) and their targets: ``cosine``
    (1 - cosine of the flattened maps) or ``l2`` (||phi - phi0|| / ||phi0||); ``pooled`` compares the
    maps' spatial means."""
    if pooled:
        features, target = features.mean((2, 3)), target.mean((2, 3))
    features, target = features.flatten(1), target.flatten(1)
    if distance == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(features, target, dim=1, eps=1e-8)
    return (features - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)


def check_steering(
    strength: float, inner_steps: int, inner_step_size: float, start: float, stop: float, distance: str
) -> None:
    """Raise ``FeatInvError`` naming the first steering setting out of its limits (the settings
    that guided and hybrid sampling share)."""
    within("strength", strength, "strength")
    within("step_size", inner_step_size, "inner_step_size")
    within("inner_steps", inner_steps, "inner_steps")
    if not 0.0 <= start < stop <= 1.0:
        raise FeatInvError(
            f"start and stop must satisfy 0 <= start < stop <= 1 (fractions of the steps), "
            f"got start={start}, stop={stop}"
        )
    if distance not in DISTANCES:
        raise FeatInvError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")


def guided_timesteps(timesteps: Sequence[int], strength: float, start: float, stop: float) -> set[int]:
    """The timesteps of a sampler's steps that are guided: step i of n when ``strength > 0`` and
    ``start <= i / n < stop`` (fractions of the way from noise to image)."""
    n = len(timesteps)
    if strength <= 0:
        return set()
    return {int(t) for i, t in enumerate(timesteps) if start <= i / n < stop}


def unit_rms(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (B, ...) divided by its root-mean-square per image."""
    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return grad / rms.view(-1, *[1] * (grad.dim() - 1))


class FeatureGuidance:
    """Steers denoisers toward target feature maps (see the module's docstring).

    Args:
        extractor: the frozen classifier and layer (float32, on the samples' device).
        decode: diffusion samples (B, C', H', W') -> images (B, 3, H, W) in [0, 1], differentiably
            (``FeatInvModel.decode(..., straight_through=True)``).
        alphas: the noise schedule's cumulative alphas, indexed by timestep.
        strength: forward guidance's share of the noise prediction (unit-RMS gradient per image).
        inner_steps: backward-guidance steps on x0 per guided step (0: none).
        inner_step_size: RMS change of x0 per inner step.
        distance: ``cosine`` or ``l2``.
        pooled: compare the maps' spatial means.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        decode: Callable[[torch.Tensor], torch.Tensor],
        alphas: Sequence[float],
        *,
        strength: float,
        inner_steps: int,
        inner_step_size: float,
        distance: str = "cosine",
        pooled: bool = False,
    ) -> None:
        self.extractor, self.decode, self.alphas = extractor, decode, alphas
        self.strength, self.inner_steps, self.inner_step_size = strength, inner_steps, inner_step_size
        self.distance_name, self.pooled = distance, pooled

    def steer(
        self,
        denoise: Denoise,
        target: torch.Tensor,
        guided: Iterable[int],
        differentiable: Denoise | None = None,
    ) -> Denoise:
        """``denoise`` with its noise prediction at the ``guided`` timesteps steered toward ``target``
        (B, C, h, w). ``differentiable``: the same denoiser with autograd (``denoise`` itself when it
        records gradients); it is what runs at the guided steps. No guided timestep (or strength 0):
        ``denoise`` itself, unchanged."""
        guided = set(guided)
        if not guided or self.strength <= 0:
            return denoise
        differentiable = differentiable or denoise

        def steered(x: torch.Tensor, t: int) -> torch.Tensor:
            if int(t) not in guided:
                return denoise(x, t)
            alpha = self.alphas[int(t)]
            sqrt_alpha, sqrt_beta = math.sqrt(alpha), math.sqrt(1.0 - alpha)
            with torch.enable_grad():
                x_t = x.detach().float().requires_grad_(True)
                eps = differentiable(x_t, t).float()
                loss = self.distance((x_t - sqrt_beta * eps) / sqrt_alpha, target)
                (grad,) = torch.autograd.grad(loss.sum(), x_t)
            eps = eps.detach() + self.strength * sqrt_beta * unit_rms(grad)
            if self.inner_steps == 0:
                return eps
            x0 = self.refine((x - sqrt_beta * eps) / sqrt_alpha, target)
            return (x - sqrt_alpha * x0) / sqrt_beta

        return steered

    def refine(self, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Backward guidance: ``inner_steps`` normalised gradient steps of the feature distance on
        the clean estimates x0 (B, C', H', W')."""
        x0 = x0.detach()
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                x0.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.distance(x0, target).sum(), x0)
            x0 = (x0 - self.inner_step_size * unit_rms(grad)).detach()
        return x0

    def distance(self, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image feature distance (B,) of the images the clean estimates x0 decode to."""
        return feature_distance(self.features_of(x0), target, self.distance_name, self.pooled)

    def features_of(self, x0: torch.Tensor) -> torch.Tensor:
        """The classifier's maps of the images x0 decodes to, differentiably (the [0, 1] clamp of
        ``decode`` passes gradients straight through: an early, out-of-range estimate still gets a
        direction)."""
        features = self.extractor._features(self.extractor.normalize(self.decode(x0)))
        if not features.requires_grad:
            raise FeatInvError(
                f"{self.extractor.spec.describe()} gives no gradient with respect to its input (a layer detaches it "
                "or runs under no_grad): feature guidance needs a classifier that is differentiable up to the chosen "
                "layer"
            )
        return features
