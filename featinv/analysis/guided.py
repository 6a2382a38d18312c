"""Training-free inversion: sample from the base diffusion model alone (no ControlNet), and steer
every step toward images whose feature map matches the target.

At a guided step the clean estimate x0 of the base's noise prediction is decoded, sent through the
classifier, and the gradient of the feature distance steers the step, by forward and backward
guidance as in universal guidance (Bansal et al., "Universal Guidance for Diffusion Models", CVPR-W
2023; the steering itself is :mod:`featinv.analysis.feature_guidance`, shared with hybrid sampling,
which guides the FeatInv model's own denoiser instead, :mod:`featinv.analysis.hybrid`).

Feature inversion by guiding a frozen diffusion model: Shirahama et al. 2025 (arXiv 2509.07936),
Rousselot, Wendebourg & Koethe 2026 (arXiv 2603.21782). The defaults were chosen on 16 shapes
images of a validation seed (7; the evaluation's held-out seed is another): backward guidance alone
reached cosine 0.90 but left adversarial high-frequency texture in the pictures (its edits sit off
the data manifold: unguided last steps undo them); forward guidance moves the object itself.

Cost: per guided step one backward pass through the UNet, the VAE decoder and the classifier, and
one more through the decoder and classifier per inner step. With strength 0 nothing is guided and
the sampler is the base model's own, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from featinv import choices
from featinv.analysis.feature_guidance import FeatureGuidance, check_steering, feature_distance, guided_timesteps
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, check_images
from featinv.limits import within
from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import Reconstruction, Reconstructor, batch_noise, features_to_invert, resolve_device
from featinv.sampling import SAMPLER_LOOPS, classifier_free_guidance
from featinv.sampling.guidance import Denoise

DISTANCES = choices.DISTANCES
GUIDED_SAMPLERS = choices.ODE_SAMPLERS  # the ODE samplers of the base (lcm is a distilled model's)


@dataclass(frozen=True)
class GuidanceConfig:
    """How the sampling is guided.

    Attributes:
        strength: forward guidance: the gradient's share of the noise prediction, the gradient
            normalised to unit root-mean-square per image; 0 switches all guidance off.
        inner_steps: backward-guidance steps on x0 per guided sampler step (0: none).
        inner_step_size: how far each inner step moves x0, as a root-mean-square change per element
            (pixels in [-1, 1], or VAE latents).
        start, stop: the guided share of the sampler's steps, as fractions of the way from noise
            (0) to image (1): steps i with ``start <= i / steps < stop`` are guided.
        distance: ``cosine`` (1 - cosine of the flattened maps) or ``l2`` (||phi - phi0|| / ||phi0||).
        pooled: compare the maps' spatial means (what a pooled target fixes) instead of the maps.
        steps: sampler steps.
        sampler: ``ddim`` or ``dpmpp``.
        guidance_scale: classifier-free guidance on the model's prompt (<= 1: the prompt's branch
            alone).
    """

    strength: float = 0.3
    inner_steps: int = 2
    inner_step_size: float = 0.01
    start: float = 0.0
    stop: float = 1.0
    distance: str = "cosine"
    pooled: bool = False
    steps: int = 20
    sampler: str = "ddim"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        check_steering(self.strength, self.inner_steps, self.inner_step_size, self.start, self.stop, self.distance)
        within("steps", self.steps, "steps")
        if self.sampler not in GUIDED_SAMPLERS:
            raise FeatInvError(f"sampler must be one of {', '.join(GUIDED_SAMPLERS)}, got {self.sampler!r}")
        within("guidance", self.guidance_scale, "guidance_scale")

    def guided(self, i: int) -> bool:
        """Whether sampler step i (0 = the noisiest) is guided."""
        return self.strength > 0 and self.start <= i / self.steps < self.stop


class GuidedReconstructor:
    """Reconstructs images from feature maps with a FeatInv model's base alone, guided by the
    classifier's gradients (see the module's docstring). The model's ControlNet is never used, so
    an untrained model (``featinv create``) serves: it supplies the base, its VAE, prompt contexts
    and noise schedule.

    Args:
        model: a FeatInv model on the base to sample from.
        extractor: the classifier and layer whose maps are inverted (default: the model's). Any
            classifier and layer go, if the gradient reaches the input through them.
        device: ``cpu``, ``cuda`` or ``auto``.
        config: the guidance settings (:class:`GuidanceConfig`).
    """

    def __init__(
        self,
        model: FeatInvModel,
        *,
        extractor: FeatureExtractor | None = None,
        device: str | torch.device | None = "cpu",
        config: GuidanceConfig = GuidanceConfig(),
    ) -> None:
        extractor = extractor if extractor is not None else model.classifier
        if extractor is None:
            raise FeatInvError("guided inversion needs a classifier: the model stores none, pass extractor=")
        self.device = resolve_device(device)
        self.model = model.to(self.device, torch.float32).eval()
        self.extractor = extractor.to(self.device, torch.float32).eval().requires_grad_(False)
        self.config = config
        self.steering = FeatureGuidance(
            self.extractor,
            lambda x0: self.model.decode(x0, straight_through=True),
            model.noise_schedule.alphas_cumprod(),
            strength=config.strength,
            inner_steps=config.inner_steps,
            inner_step_size=config.inner_step_size,
            distance=config.distance,
            pooled=config.pooled,
        )

    @property
    def spec(self):
        return self.extractor.spec

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w) of (B, 3, H, W) images in [0, 1]."""
        check_images(images)
        return self.extractor(images.to(self.device, torch.float32))

    def base_denoiser(self, batch: int) -> Denoise:
        """(x, t) -> eps of the base UNet with the model's prompt, no ControlNet (B = ``batch``)."""
        unet, model = self.model.unet, self.model
        if self.config.guidance_scale <= 1.0:
            context = model.context.expand(batch, -1, -1)
            return lambda x, t: unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        pair = model.guidance_contexts(batch)
        return classifier_free_guidance(
            lambda x, t: unet(x, t, encoder_hidden_states=pair, return_dict=False)[0], self.config.guidance_scale
        )

    def guided_denoiser(self, target: torch.Tensor, timesteps: Sequence[int]) -> Denoise:
        """The base denoiser, its noise prediction at each guided step steered toward the target
        maps ``target`` (B, C, h, w) by forward and backward guidance (see the module)."""
        config = self.config
        guided = guided_timesteps(timesteps, config.strength, config.start, config.stop)
        return self.steering.steer(self.base_denoiser(len(target)), target, guided)

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        seed: int = 0,
        first_index: int = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int = 8,
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> Reconstruction:
        """Reconstruct images from feature maps (given, or taken from ``images``), image i from noise
        seeded ``seed + first_index + i`` as :meth:`featinv.pipeline.Reconstructor.reconstruct`.

        Args:
            images: (B, 3, H, W) in [0, 1].
            features: (B, C, h, w) feature maps of the classifier's spec (instead of ``images``).
            batch_size: images per batch (each guided step holds their activations for a backward pass).
            callback: called after every step with ``{"i", "t", "x", "denoised", "batch"}``.
        """
        features = features_to_invert(images, features, self.features, self.spec, self.device)
        within("batch_size", batch_size, "batch_size")
        config, n = self.config, len(features)
        self.model.noise_schedule.check_steps(config.steps)
        generators = Reconstructor._generators(n, seed, first_index, generator)
        schedule = self.model.noise_schedule.for_sampler(config.sampler, config.steps)
        outputs = []
        bar = tqdm(total=n * config.steps, desc="guided sampling", unit="step", disable=not progress, leave=False)
        try:
            for start in range(0, n, batch_size):
                chunk = features[start : start + batch_size]
                batch_generators, x = batch_noise(
                    generators, start, start + len(chunk), self.model.latent_shape, self.device
                )

                def on_step(info: dict, start: int = start, rows: int = len(chunk)) -> None:
                    bar.update(rows)
                    if callback is not None:
                        callback({**info, "batch": start // batch_size})

                denoise = self.guided_denoiser(chunk, schedule.timesteps)
                outputs.append(
                    SAMPLER_LOOPS[config.sampler](denoise, x, schedule, generator=batch_generators, callback=on_step)
                )
        finally:
            bar.close()
        samples = torch.cat(outputs)
        images_out = torch.cat([self.model.decode(s) for s in samples.split(batch_size)])
        if not bool(torch.isfinite(images_out).all()):
            raise FeatInvError(
                f"guided sampling gave NaN or Inf values: likely strength {config.strength} is too large"
            )
        return Reconstruction(images=images_out.float().cpu(), features=features.cpu(), samples=samples.cpu())


__all__ = ["DISTANCES", "GUIDED_SAMPLERS", "GuidanceConfig", "GuidedReconstructor", "feature_distance"]
