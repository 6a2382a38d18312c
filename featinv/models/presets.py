"""Model presets: configs for the base UNet (and VAE) of a FeatInv model.

* ``tiny``: a small pixel-space UNet (the built-in demo).
* ``micro``: a smaller one still, 16x16 pixels (tests and smoke runs: a 50-step reconstruction in
  about a second on one core).
* ``minisd``: the SD1.x UNet and VAE at 256x256 (32x32 latents), as published.
* ``sd15``: the SD1.x UNet and VAE at 512x512 (64x64 latents).

Presets give architecture only (random weights); real weights come from ``FeatInvModel.from_base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from featinv.errors import FeatInvError

_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_TINY_UNET = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

_MICRO_UNET = {
    **_TINY_UNET,
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
}


@dataclass(frozen=True)
class Preset:
    """Architecture of a FeatInv model's base.

    Attributes:
        unet: ``UNet2DConditionModel`` config (``sample_size`` is set from ``image_size``).
        vae: ``AutoencoderKL`` config, or None for a pixel-space model.
        image_size: output image side in pixels.
        context_length: tokens in the stored contexts.
        hint_channels: hidden width of the hint encoder.
    """

    unet: dict[str, Any]
    vae: dict[str, Any] | None
    image_size: int
    context_length: int
    hint_channels: int = 512

    @property
    def latent_size(self) -> int:
        if self.vae is None:
            return self.image_size
        return self.image_size // 2 ** (len(self.vae["block_out_channels"]) - 1)

    def unet_config(self) -> dict[str, Any]:
        return {**self.unet, "sample_size": self.latent_size}


PRESETS = {
    "tiny": Preset(unet=_TINY_UNET, vae=None, image_size=32, context_length=4, hint_channels=64),
    "micro": Preset(unet=_MICRO_UNET, vae=None, image_size=16, context_length=4, hint_channels=16),
    "minisd": Preset(unet=_SD_UNET, vae=_SD_VAE, image_size=256, context_length=77),
    "sd15": Preset(unet=_SD_UNET, vae=_SD_VAE, image_size=512, context_length=77),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    """A preset by name; ``overrides`` replace UNet config keys or the preset's own fields
    (``image_size``, ``context_length``, ``hint_channels``; ``vae`` is a dict of VAE config keys)."""
    if name not in PRESETS:
        raise FeatInvError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    own = {k: overrides.pop(k) for k in ("image_size", "context_length", "hint_channels", "vae") if k in overrides}
    if "vae" in own and preset.vae is None:
        raise FeatInvError(f"preset {name!r} is pixel-space and has no VAE to override")
    unet = {**preset.unet, **overrides}
    return Preset(
        unet=unet,
        vae={**preset.vae, **own["vae"]} if "vae" in own else preset.vae,
        image_size=own.get("image_size", preset.image_size),
        context_length=own.get("context_length", preset.context_length),
        hint_channels=own.get("hint_channels", preset.hint_channels),
    )
