"""Validation pictures during ControlNet training, as diffusers' ControlNet training script logs
them: every N steps, a few fixed images are reconstructed from their feature maps with the weights
trained so far, and ``original | reconstruction`` is saved as ``<out>/step-NNNNNNN.png``."""

from __future__ import annotations

from pathlib import Path

import torch

from featinv.errors import FeatInvError, require_positive_int
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel

VALIDATION_IMAGES = 4


class Validation:
    """A ``Trainer`` ``after_step`` hook.

    Args:
        model: the model being trained (its ControlNet changes between calls).
        extractor: the classifier giving the feature maps.
        images: (N, 3, H, W) in [0, 1], the fixed validation images.
        out: the folder of the grids.
        every: steps between grids (the last step of a run gets one too, see ``final_step``).
        final_step: the run's last step.
        steps: sampler steps of each reconstruction (DPM-Solver++(2M)).
        is_main: only the main process samples and writes.
    """

    def __init__(
        self,
        model: FeatInvModel,
        extractor: FeatureExtractor,
        images: torch.Tensor,
        out: str | Path,
        *,
        every: int,
        final_step: int,
        steps: int = 20,
        is_main: bool = True,
    ) -> None:
        self.every = require_positive_int("--validate-every", every)
        self.steps = require_positive_int("--validation-steps", steps)
        if images.ndim != 4 or len(images) == 0:
            raise FeatInvError(f"validation images must be (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
        self.model, self.extractor, self.images = model, extractor, images
        self.out, self.final_step, self.is_main = Path(out), final_step, is_main

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if not self.is_main or (step % self.every and step != self.final_step):
            return
        from featinv.images import make_grid, save_image
        from featinv.pipeline import Reconstructor

        device = self.model.context.device
        reconstructor = Reconstructor(self.model, extractor=self.extractor, device=device)
        result = reconstructor.reconstruct(
            self.images.to(device), steps=self.steps, sampler="dpmpp", seed=0, progress=False
        )
        self.out.mkdir(parents=True, exist_ok=True)
        grid = make_grid([self.images.cpu(), result.images], scale=max(1, 128 // self.images.shape[-1]))
        path = self.out / f"step-{step:07d}.png"
        temporary = path.with_name(f".{path.name}.tmp")
        save_image(grid, temporary)
        temporary.replace(path)


def validation_images(stream, size: int, files: list[str] | None = None) -> tuple[torch.Tensor, str]:
    """The validation images and where they come from: ``files`` if given; for the shapes stream,
    held-out shapes images (the demo's seed, never trained on); for an image folder, images spread
    over it, centre-cropped (training images, so this shows progress, not generalisation)."""
    from featinv.images import load_images

    if files:
        return load_images(files, (size, size)), f"{len(files)} given images"
    identity = getattr(stream, "identity", {})
    if "files_sha256" not in identity:
        from featinv.data.shapes import DEMO_SEED, generate_shapes

        return generate_shapes(VALIDATION_IMAGES, DEMO_SEED, size=size).images, "held-out shapes images"
    count = min(VALIDATION_IMAGES, len(stream.files))
    picks = [round(i * (len(stream.files) - 1) / max(1, count - 1)) for i in range(count)]
    return load_images([stream.files[i] for i in picks], (size, size)), "images of the training folder"
