"""The ControlNet and the UNet's encoder run as one network of two weight sets (a fast-path option).

The ControlNet is a copy of the UNet's encoder (time embedding, ``conv_in``, down blocks, mid
block) with its own weights, applied to the same sample, timestep and contexts; it only adds the
hint after ``conv_in`` and passes its outputs through zero convolutions. A guided step therefore
runs one function (``unet_encode``) twice with two weight sets. ``torch.func.vmap`` over the
stacked weight sets runs it once: each convolution becomes one grouped convolution (two groups),
each linear layer one batched matmul, each norm and pointwise chain one kernel, each attention one
call with both networks in its batch: half as many kernels there, each twice as wide, the same
arithmetic element by element (up to reduction order). Meant for one image, where each of the
step's ~571 kernels (miniSD) sees a batch of 2 and the GPU is far from full; at large batches the
GPU is full either way. It replaces the default path's second stream (ControlNet concurrent with the
UNet's encoder); which wins at which batch is measured by ``benchmarks/bench_gpu.py``.

Cost: the stacked weights are copies (channels-last for convolutions), ~1.4 GB in fp16 at miniSD
scale, taken when the fast path is built (a snapshot, like its other constants).
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch.func import functional_call, vmap

from featinv.engine.pieces import ModuleCall, Piece
from featinv.engine.split_unet import unet_encode
from featinv.errors import FeatInvError

ENCODER = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")


def check_twins(unet: UNet2DConditionModel, controlnet: ControlNetModel) -> None:
    """Raise FeatInvError unless the ControlNet's encoder is the UNet's with other weights."""
    for name, plain in (
        ("controlnet_conditioning_channel_order", "rgb"),
        ("global_pool_conditions", False),
        ("class_embed_type", None),
        ("addition_embed_type", None),
    ):
        if controlnet.config.get(name, plain) != plain:
            raise FeatInvError(f"the twin encoder needs a ControlNet with {name}={plain!r}")
    for attribute in ("num_channels", "flip_sin_to_cos", "downscale_freq_shift", "scale"):
        if getattr(unet.time_proj, attribute, None) != getattr(controlnet.time_proj, attribute, None):
            raise FeatInvError(f"the twin encoder needs equal time projections; {attribute} differs")
    ours = {n: m for n, m in unet.named_modules() if n.startswith(ENCODER)}
    theirs = {n: m for n, m in controlnet.named_modules() if n.startswith(ENCODER)}
    mismatch = sorted(set(ours) ^ set(theirs)) or [n for n in ours if type(ours[n]) is not type(theirs[n])]
    shapes = {n: p.shape for n, p in unet.named_parameters() if n.startswith(ENCODER)}
    mismatch += [n for n, p in controlnet.named_parameters() if n.startswith(ENCODER) and shapes.get(n) != p.shape]
    if mismatch:
        raise FeatInvError(f"the ControlNet's encoder is not the UNet's (first difference: {mismatch[0]})")


def _stack(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """(2, *shape): ``ours`` then ``theirs``; 4-D weights channels-last in each half, so that the
    grouped convolution's (2 * O, I, kh, kw) weight is a channels-last view."""
    if ours.dim() != 4:
        return torch.stack([ours.detach(), theirs.detach()])
    out, channels, height, width = ours.shape
    stacked = ours.new_empty(2, out, height, width, channels).permute(0, 1, 4, 2, 3)
    stacked[0], stacked[1] = ours.detach(), theirs.detach()
    return stacked


def _by_path(module: torch.nn.Module, objects: dict) -> dict[str, object]:
    """module path -> the object ``objects`` holds for that submodule."""
    return {name: objects[sub] for name, sub in module.named_modules() if sub in objects}


def _zero_convs(controlnet: ControlNetModel, skips: tuple, mid: torch.Tensor) -> tuple:
    """The ControlNet's outputs from its encoder's: (down residuals, mid residual)."""
    down = tuple(block(skip) for block, skip in zip(controlnet.controlnet_down_blocks, skips, strict=True))
    return down, controlnet.controlnet_mid_block(mid)


class TwinEncoder(Piece):
    """The UNet's encoder and the ControlNet in one call: ``(sample, t, context, hint)`` ->
    ``(emb, skips, mid, down_residuals, mid_residual)``, what ``unet_encode`` and the ControlNet give.

    Args:
        unet, controlnet: the base UNet and the (diffusers) ControlNet, same encoder architecture.
        channels_last: channels-last copies of the zero convolutions' weights (the stacked
            convolution weights are channels-last always).
        processors, time_tables, clock, time_embeddings: the fast path's constants for both
            networks (as :class:`Piece` takes them); each UNet table and processor tensor is
            stacked with the ControlNet's.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        *,
        channels_last: bool = True,
        processors: dict | None = None,
        time_tables: dict | None = None,
        clock=None,
        time_embeddings: dict | None = None,
    ) -> None:
        check_twins(unet, controlnet)
        super().__init__(
            unet_encode,
            unet,
            processors=processors,
            time_tables=time_tables,
            clock=clock,
            time_embeddings=time_embeddings,
        )
        ours, theirs = dict(unet.named_parameters()), dict(controlnet.named_parameters())
        stubbed = ("time_embedding.",) if unet in (time_embeddings or {}) else ()  # no weights read there
        stacked = {
            f"module.{n}": _stack(p, theirs[n])
            for n, p in ours.items()
            if n.startswith(ENCODER) and not (stubbed and n.startswith(stubbed))
        }
        # The constants are reached by name too: tables as the resnets' time_emb_proj during the call,
        # processors' tensors through a module list of the piece's own.
        tables, their_tables = _by_path(unet, time_tables or {}), _by_path(controlnet, time_tables or {})
        procs, their_procs = _by_path(unet, processors or {}), _by_path(controlnet, processors or {})
        for what, mine, other in (("time tables", tables, their_tables), ("attention processors", procs, their_procs)):
            if {p for p in mine if p.startswith(ENCODER)} != {p for p in other if p.startswith(ENCODER)}:
                raise FeatInvError(f"the twin encoder needs the same {what} in both networks' encoders")
        for path, table in tables.items():
            if path.startswith(ENCODER):
                stacked[f"module.{path}.time_emb_proj.table"] = _stack(table.table, their_tables[path].table)
        paths = [path for path in procs if path.startswith(ENCODER)]
        self.call.processor_tensors = torch.nn.ModuleList(procs[path].tensors for path in paths)
        for i, path in enumerate(paths):
            for name, tensor in procs[path].tensors.named_buffers():
                stacked[f"processor_tensors.{i}.{name}"] = _stack(tensor, getattr(their_procs[path].tensors, name))
        self.stacked = stacked
        self.outputs = ModuleCall(_zero_convs, controlnet)
        self.output_weights = {
            f"module.{n}": p.detach().to(memory_format=torch.channels_last) if channels_last and p.dim() == 4 else p
            for n, p in theirs.items()
            if n.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))
        }

    def run(self, sample, timestep, context, hint):
        """Both networks' encoders as one vmapped call, then the ControlNet's zero convolutions."""
        hints = torch.stack([torch.zeros_like(hint), hint])  # the UNet adds nothing after conv_in

        def one(weights, add):
            return functional_call(self.call, weights, (sample, timestep, context, add), strict=False)

        emb, skips, mid = vmap(one)(self.stacked, hints)
        ours, theirs = tuple(skip[0] for skip in skips), tuple(skip[1] for skip in skips)
        down, mid_residual = functional_call(self.outputs, self.output_weights, (theirs, mid[1]), strict=False)
        return emb[0], ours, mid[0], down, mid_residual
