"""Hybrid sampling: the learned inverter refined by feature guidance.

FeatInv's sampler (ControlNet + base, classifier-free guidance as the model is sampled) puts the
sample near an image of the data that has the target feature map; at the guided share of its steps
the gradient of the feature distance to that map (forward and backward guidance,
:mod:`featinv.analysis.feature_guidance`, the same steering as training-free guided sampling) then
finishes the match. Steps, sampler, guidance scale and seeding are the model's own
(:meth:`featinv.pipeline.Reconstructor.reconstruct`): 50 DDIM steps and guidance 1.75, or a distilled
model's few-step sampler; latent models are decoded by their VAE before the classifier sees them.

Defaults (:class:`HybridConfig`) chosen on the shapes images of ``featinv.data.shapes.VALIDATION_SEED``,
never the evaluation's held-out ones: see ``HybridConfig``.

Cost: per guided step one backward pass through the ControlNet, the UNet (both branches of
classifier-free guidance), the decoder and the classifier, and one more through the decoder and the
classifier per inner step. With strength 0 nothing is guided and the sampler is FeatInv's own, bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from featinv.analysis.feature_guidance import FeatureGuidance, check_steering, guided_timesteps
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import Reconstructor

# A distilled (few-step) model's defaults: backward guidance (see HybridConfig).
FEW_STEP_DEFAULTS = {"strength": 0.001, "inner_steps": 3, "inner_step_size": 0.003}


@dataclass(frozen=True)
class HybridConfig:
    """How FeatInv's sampling is refined.

    The defaults were chosen on 48 shapes images of ``VALIDATION_SEED`` (never the evaluation's
    held-out seed), FeatInv sampled as ``featinv evaluate`` samples it (10 DPM-Solver++ steps,
    guidance 1.75), for each shipped family. Forward guidance at every step, strength 0.05, no inner
    steps: ConvNeXt top-1 agreement 0.938 -> 0.979, cosine 0.909 -> 0.929, mask IoU 0.527 -> 0.555,
    FID 6.0 -> 6.3 (noise at 48 images); ResNet 0.875 -> 0.938 top-1, cosine 0.915 -> 0.952; ViT 0.896
    -> 0.979, cosine 0.839 -> 0.925, IoU 0.51 -> 0.65. Tried and not kept: strength 0.3 (guided
    sampling's; cosine fell to 0.73, FID tripled: the learned denoiser needs only a nudge), 0.08 and
    1.0 (worse than 0.05 on every metric), 0.03 and 0.04 (as good on ConvNeXt, behind on ResNet and
    ViT), the L2 distance (behind cosine), guidance on the first 30-70% of the steps only (cheaper,
    smaller gains), on the last half or last step only (cosine down or up, top-1 and FID worse:
    late edits sit off the data), backward guidance (1-20 inner steps of 0.003-0.02: cosine up to
    0.954 but top-1 and FID worse, or everything worse at 0.02).

    A distilled model's 4 large steps do not take forward guidance: on the real-time demo model (32
    images of the same seed) cosine 0.908 fell to 0.894, 0.842 and 0.664 at strengths 0.01, 0.05 and
    0.1 (whichever steps were guided). Backward guidance edits the clean estimate directly and does
    take it: 3 inner steps of 0.003 at every step (forward strength 0.001, which only switches
    guidance on) gave cosine 0.955 and top-1 0.938 (from 0.906); 5-10 inner steps on the last half
    or quarter only, 0.937-0.966 and 0.875-0.938. Those are :data:`FEW_STEP_DEFAULTS`
    (:meth:`for_model`).

    Attributes:
        strength: forward guidance: the gradient's share of the noise prediction (unit RMS per
            image); 0 switches all refinement off (FeatInv's own samples).
        inner_steps: backward-guidance steps on the clean estimate per guided step (0: none).
        inner_step_size: RMS change of the clean estimate per inner step.
        start, stop: the guided share of the steps, as fractions of the way from noise (0) to image
            (1): steps i with ``start <= i / steps < stop`` are guided.
        distance: ``cosine`` or ``l2``.
        pooled: compare the maps' spatial means (set for a model of pooled maps).
    """

    strength: float = 0.05
    inner_steps: int = 0
    inner_step_size: float = 0.01
    start: float = 0.0
    stop: float = 1.0
    distance: str = "cosine"
    pooled: bool = False

    @classmethod
    def for_model(cls, model: FeatInvModel) -> HybridConfig:
        """The defaults for ``model``'s own sampling: these fields' defaults, or for a distilled model
        (a few-step sampler) backward guidance instead (see the class: forward guidance there lowers
        the cosine at every strength tried)."""
        return cls(**FEW_STEP_DEFAULTS) if model.few_step_sampler else cls()

    def __post_init__(self) -> None:
        check_steering(self.strength, self.inner_steps, self.inner_step_size, self.start, self.stop, self.distance)


class HybridReconstructor(Reconstructor):
    """A :class:`~featinv.pipeline.Reconstructor` whose sampling is refined by feature guidance
    (see the module): the same ``reconstruct`` (its steps, samplers, seeds ``seed + i``, progress
    bar and callbacks), the same images at strength 0.

    Args:
        model: the trained FeatInv model (pixel or latent, distilled or not).
        extractor: its classifier (default: the model's stored one), which must give gradients.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: the denoiser's dtype; the guidance's gradients are taken in it, the distance in float32.
        config: the refinement (default :meth:`HybridConfig.for_model`).
    """

    def __init__(
        self,
        model: FeatInvModel,
        *,
        extractor: FeatureExtractor | None = None,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype = torch.float32,
        config: HybridConfig | None = None,
    ) -> None:
        config = HybridConfig.for_model(model) if config is None else config
        if not isinstance(config, HybridConfig):
            raise FeatInvError(f"config must be a HybridConfig, got {type(config).__name__}")
        super().__init__(model, extractor=extractor, device=device, dtype=dtype)
        if self.extractor is None:
            raise FeatInvError("hybrid sampling needs the classifier: the model stores none, pass extractor=")
        self.extractor.requires_grad_(False)
        self.config = config
        unet_dtype = self.model.unet.dtype
        self.steering = FeatureGuidance(
            self.extractor,
            lambda x0: self.model.decode(x0.to(unet_dtype), straight_through=True),
            self.model.noise_schedule.alphas_cumprod(),
            strength=config.strength,
            inner_steps=config.inner_steps,
            inner_step_size=config.inner_step_size,
            distance=config.distance,
            pooled=config.pooled or self.spec.mode == "pooled",
        )

    def batch_denoiser(
        self, features: torch.Tensor, guidance_scale: float, guidance: str, timesteps: Sequence[int]
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """FeatInv's denoiser of the batch ``features`` (B, C, h, w), steered toward those maps at
        the guided share of ``timesteps``."""
        own = super().batch_denoiser(features, guidance_scale, guidance, timesteps)
        config = self.config
        guided = guided_timesteps(timesteps, config.strength, config.start, config.stop)
        if not guided:
            return own
        differentiable = self.differentiable_denoiser(features, guidance_scale, guidance)
        return self.steering.steer(own, features.float(), guided, differentiable)
