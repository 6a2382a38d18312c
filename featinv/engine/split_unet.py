"""The base UNet's forward split in two at the ControlNet injection points.

The UNet's encoder (time embedding, ``conv_in``, down blocks, mid block) does not depend on the
ControlNet; only the skip connections and the mid-block output receive its residuals. Split there,
the encoder can run concurrently with the ControlNet (two CUDA streams in one captured graph),
and the decoder adds the residuals and runs the up blocks. ``encode`` then ``decode`` computes what
``UNet2DConditionModel.forward`` computes with ``down_block_additional_residuals`` and
``mid_block_additional_residual`` (tested), for the configurations FeatInv uses: no class or
addition embeddings, no encoder projection, no adapters.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from featinv.errors import FeatInvError

_UNSUPPORTED = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim_type": None,
    "time_embedding_act_fn": None,
    "center_input_sample": False,
}


def check_splittable(unet: UNet2DConditionModel) -> None:
    """Raise FeatInvError if ``unet`` uses a feature the split forward does not reproduce."""
    for key, plain in _UNSUPPORTED.items():
        if unet.config.get(key, plain) != plain:
            raise FeatInvError(f"the fast path supports UNets with {key}={plain!r}, this one has {unet.config[key]!r}")


def unet_encode(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    hint: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """The UNet up to and including its mid block: (emb (B, E), skips, mid (B, C, h, w)).

    Shapes: ``sample`` (B, C, H, W); ``timestep`` a scalar, (1,) or (B,) tensor; ``context`` (B, L, D);
    ``hint`` (B, C0, H, W), added after ``conv_in``: with it, and the ControlNet's weights, this is
    the ControlNet before its zero convolutions (what ``featinv.engine.twin_encoder`` relies on).
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    hidden = unet.conv_in(sample)
    if hint is not None:
        hidden = hidden + hint
    skips: tuple[torch.Tensor, ...] = (hidden,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, residuals = block(hidden_states=hidden, temb=emb)
        skips += residuals
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
        else:
            hidden = unet.mid_block(hidden, emb)
    return emb, skips, hidden


def unet_decode(
    unet: UNet2DConditionModel,
    emb: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    mid: torch.Tensor,
    context: torch.Tensor,
    down_residuals: tuple[torch.Tensor, ...],
    mid_residual: torch.Tensor,
) -> torch.Tensor:
    """Add the ControlNet residuals to the skips and the mid output, run the up blocks: eps (B, C, H, W)."""
    if len(skips) != len(down_residuals):
        raise FeatInvError(f"the ControlNet gives {len(down_residuals)} residuals for {len(skips)} skip connections")
    skips = tuple(skip + residual for skip, residual in zip(skips, down_residuals, strict=True))
    hidden = mid + mid_residual
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in skips[0].shape[-2:])  # skips[0]: the input size
    for i, block in enumerate(unet.up_blocks):
        residuals, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(
                hidden_states=hidden,
                temb=emb,
                res_hidden_states_tuple=residuals,
                encoder_hidden_states=context,
                upsample_size=upsample_size,
            )
        else:
            hidden = block(
                hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals, upsample_size=upsample_size
            )
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
