"""The eager backend: ControlNet then base UNet, in plain PyTorch (the numerical reference)."""

from __future__ import annotations

import torch

from featinv.models.featinv_model import FeatInvModel


class EagerDenoiser:
    """eps = UNet(x, t, context, + ControlNet(x, t, context, hint) residuals).

    Args:
        model: the FeatInv model; inputs are cast to its UNet's dtype, eps is returned in float32.
        conditioning_scale: multiplier of the ControlNet residuals (1.0 as trained).
    """

    def __init__(self, model: FeatInvModel, conditioning_scale: float = 1.0) -> None:
        self.model = model
        self.conditioning_scale = conditioning_scale

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.predict(sample, timestep, hint, context)

    def predict(self, sample: torch.Tensor, timestep: int, hint: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The same eps, recording autograd where it is on (guidance through the denoiser)."""
        dtype = self.model.unet.dtype
        sample, hint, context = sample.to(dtype), hint.to(dtype), context.to(dtype)
        t = torch.tensor(timestep, dtype=torch.long, device=sample.device)
        return self.model.predict_noise(sample, t, context, hint, self.conditioning_scale).float()
