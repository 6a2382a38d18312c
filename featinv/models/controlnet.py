"""The FeatInv ControlNet: diffusers' ``ControlNetModel`` with the FeatInv hint encoder as its
conditioning embedding.

The hint encoder is kept outside the ControlNet's forward (its ``controlnet_cond_embedding`` is
the identity) so that callers embed a feature map once per sample and reuse the embedding at every
denoising step. ``ControlNetModel`` with ``controlnet_cond_embedding = hint_encoder`` computes the
same numbers; ``tests/test_reference_equivalence.py`` checks that.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from featinv.models.hint_encoder import HintEncoder

# The embedding diffusers would build is replaced at once; the smallest valid one is built first.
_PLACEHOLDER_EMBEDDING = {"conditioning_embedding_out_channels": (1,), "conditioning_channels": 1}


def _public(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


class FeatInvControlNet(ModelMixin, ConfigMixin):
    """ControlNet conditioned on a classifier's feature map.

    Args:
        controlnet_config: the ``ControlNetModel`` config (usually derived from the base UNet).
        feature_channels: C of the feature map.
        latent_size: (H, W) of the diffusion sample.
        hint_channels: hidden width of the hint encoder.
    """

    @register_to_config
    def __init__(
        self,
        controlnet_config: dict[str, Any],
        feature_channels: int,
        latent_size: tuple[int, int] | list[int],
        hint_channels: int = 512,
    ) -> None:
        super().__init__()
        self.controlnet = ControlNetModel.from_config({**controlnet_config, **_PLACEHOLDER_EMBEDDING})
        self.controlnet.controlnet_cond_embedding = nn.Identity()
        self.hint_encoder = HintEncoder(
            feature_channels,
            self.controlnet.config.block_out_channels[0],
            tuple(latent_size),
            hidden_channels=hint_channels,
        )

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, feature_channels: int, *, hint_channels: int = 512
    ) -> FeatInvControlNet:
        """A ControlNet whose encoder copies the base UNet's weights (the ControlNet recipe)."""
        source = ControlNetModel.from_unet(unet, **_PLACEHOLDER_EMBEDDING)
        config = {k: v for k, v in _public(source.config).items() if k not in _PLACEHOLDER_EMBEDDING}
        size = unet.config.sample_size
        latent_size = (size, size) if isinstance(size, int) else tuple(size)
        model = cls(config, feature_channels, list(latent_size), hint_channels)
        weights = {k: v for k, v in source.state_dict().items() if not k.startswith("controlnet_cond_embedding.")}
        model.controlnet.load_state_dict(weights)
        return model

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature maps -> (B, C0, H, W) hint embeddings, once per sample."""
        return self.hint_encoder(features)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the base UNet: (down-block residuals, mid-block residual).

        Args:
            sample: (B, C_in, H, W) noisy sample.
            timestep: the diffusion timestep.
            encoder_hidden_states: (B, L, D) contexts.
            hint: (B, C0, H, W) from :meth:`embed`.
        """
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=hint,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return down, mid
