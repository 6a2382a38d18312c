"""The twin encoder (featinv.engine.twin_encoder): the ControlNet and the UNet's encoder as one
vmapped network give what the two give apart, leave the model as it was, and refuse a ControlNet
whose encoder is not the UNet's."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel

from featinv.engine.fast import FastPath
from featinv.engine.split_unet import unet_encode
from featinv.engine.twin_encoder import TwinEncoder, check_twins
from featinv.errors import FeatInvError
from featinv.pipeline import Reconstructor


def _distinct(model) -> None:
    """Make the ControlNet's weights differ from the UNet's (``from_unet`` copies them) and its zero
    convolutions non-zero, so that swapping the two networks, or dropping the residuals, shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.controlnet.controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flat(item)]


def _step_inputs(model, batch: int):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(2 * batch, *model.latent_shape, generator=g)
    hint = model.controlnet.embed(torch.rand(2 * batch, *model.feature_spec.shape, generator=g))
    t = torch.tensor([500]) if batch == 1 else torch.randint(0, 1000, (2 * batch,), generator=g)
    return x, t, model.guidance_contexts(batch), hint


@pytest.mark.parametrize("precomputed", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_twin_encoder_gives_the_controlnet_and_the_unet_encoder(batch, precomputed, tiny_model):
    _distinct(tiny_model)
    x, t, context, hint = _step_inputs(tiny_model, batch)
    path = FastPath(tiny_model, compile_mode=None, precomputed=precomputed, twin_encoder=True)
    assert isinstance(path.encode_both, TwinEncoder) and path.controlnet is None and not path.streams
    with torch.no_grad():
        down, mid_residual = tiny_model.controlnet(x, t, context, hint)
        emb, skips, mid = unet_encode(tiny_model.unet, x, t, context)
        got = path.encode_both(x, t, context, hint)
    want = (emb, skips, mid, down, mid_residual)
    assert float(mid_residual.abs().max()) > 1e-3  # the residuals are not zero
    assert not torch.allclose(down[-1], skips[-1], atol=1e-3)  # the networks differ
    if precomputed:  # the timestep tables leave the embedding no reader: a placeholder of its shape
        assert got[0].shape == emb.shape and not got[0].any()
        got, want = got[1:], want[1:]
    for g, w in zip(_flat(got), _flat(want), strict=True):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= 1e-5 * max(1.0, float(w.abs().max()))


def test_twin_encoder_leaves_the_model_as_it_was(tiny_model):
    _distinct(tiny_model)
    x, t, context, hint = _step_inputs(tiny_model, 1)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    processors = {name: type(p) for name, p in tiny_model.unet.attn_processors.items()}
    path = FastPath(tiny_model, compile_mode=None, twin_encoder=True)
    with torch.no_grad():
        path.encode_both(x, t, context, hint)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {name: type(p) for name, p in tiny_model.unet.attn_processors.items()} == processors
    resnet = tiny_model.unet.down_blocks[0].resnets[0]
    assert isinstance(resnet.time_emb_proj, torch.nn.Linear)


def test_a_controlnet_of_another_shape_is_refused(tiny_model):
    unet = tiny_model.unet
    config = dict(tiny_model.controlnet.controlnet.config)
    deeper = ControlNetModel.from_config({**config, "layers_per_block": config["layers_per_block"] + 1})
    with pytest.raises(FeatInvError, match="is not the UNet's"):
        check_twins(unet, deeper)
    wider = ControlNetModel.from_config({**config, "block_out_channels": [c * 2 for c in config["block_out_channels"]]})
    with pytest.raises(FeatInvError, match="twin encoder"):
        check_twins(unet, wider)
    bgr = ControlNetModel.from_config({**config, "controlnet_conditioning_channel_order": "bgr"})
    with pytest.raises(FeatInvError, match="controlnet_conditioning_channel_order"):
        check_twins(unet, bgr)
    check_twins(unet, tiny_model.controlnet.controlnet)  # the model's own passes


@pytest.mark.heavy
def test_the_compiled_twin_fast_path_equals_the_eager_loop(tiny_model):
    """vmap inside torch.compile (Inductor's CPU kernels here), through a whole sampler."""
    _distinct(tiny_model)
    g = torch.Generator().manual_seed(3)
    features = torch.rand(2, *tiny_model.feature_spec.shape, generator=g)
    latents = torch.randn(2, *tiny_model.latent_shape, generator=g)
    want = Reconstructor(tiny_model).reconstruct(features=features, latents=latents, steps=4, progress=False)
    path = FastPath(tiny_model, twin_encoder=True)
    got = path.sample(features, latents, tiny_model.noise_schedule.ddim(4), 1.75)
    assert float((got - want.samples).abs().max()) <= 1e-5 * max(1.0, float(want.samples.abs().max()))


@pytest.mark.gpu
def test_the_captured_twin_step_equals_the_eager_loop_on_the_gpu(tiny_model):
    """On CUDA, where vmap batches the two networks' attention in one call, inside a captured graph."""
    _distinct(tiny_model)
    g = torch.Generator().manual_seed(3)
    features = torch.rand(2, *tiny_model.feature_spec.shape, generator=g)
    latents = torch.randn(2, *tiny_model.latent_shape, generator=g)
    want = Reconstructor(tiny_model, device="cuda").reconstruct(
        features=features, latents=latents, steps=6, progress=False
    )
    path = FastPath(tiny_model.cuda(), compile_mode=None, twin_encoder=True)
    got = path.sample(features.cuda(), latents.cuda(), tiny_model.noise_schedule.ddim(6), 1.75)
    assert path.step_graph(2, tiny_model.noise_schedule.ddim(6), 1.75).graph is not None
    diff, scale = float((got.cpu() - want.samples).abs().max()), float(want.samples.abs().max())
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)


def test_constants_of_one_network_only_are_refused(tiny_model):
    from featinv.engine.fast_attention import fast_processors

    contexts = tiny_model.guidance_contexts(1)
    only_unet = fast_processors(tiny_model.unet, contexts)  # none for the ControlNet
    with pytest.raises(FeatInvError, match="same attention processors"):
        TwinEncoder(tiny_model.unet, tiny_model.controlnet.controlnet, processors=only_unet)
