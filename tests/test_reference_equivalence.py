"""featinv's eager reconstruction equals a loop written directly with diffusers' ControlNetModel,
UNet2DConditionModel and scheduler (the StableDiffusionControlNetPipeline recipe)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from featinv import Reconstructor


def recipe_parts(model, features):
    """A plain diffusers ControlNetModel with our hint encoder as its conditioning embedding, and the
    recipe's doubled condition and context (zero feature map + null context first)."""
    controlnet = copy.deepcopy(model.controlnet.controlnet)
    controlnet.controlnet_cond_embedding = copy.deepcopy(model.controlnet.hint_encoder)
    b = features.shape[0]
    condition = torch.cat([torch.zeros_like(features), features])
    context = torch.cat([model.null_context.expand(b, -1, -1), model.context.expand(b, -1, -1)])
    return controlnet, condition, context


def recipe_eps(model, controlnet, x, t, condition, context, guidance_scale):
    """One guided noise prediction as StableDiffusionControlNetPipeline computes it."""
    x_in = torch.cat([x] * 2)
    down, mid = controlnet(
        x_in, t, encoder_hidden_states=context, controlnet_cond=condition, conditioning_scale=1.0, return_dict=False
    )
    eps = model.unet(
        x_in,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def diffusers_recipe(model, features, latents, scheduler, steps, guidance_scale):
    """The StableDiffusionControlNetPipeline denoising loop."""
    controlnet, condition, context = recipe_parts(model, features)
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps = recipe_eps(model, controlnet, x_in, t, condition, context, guidance_scale)
            x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.fixture
def setup():
    model = make_model()
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, *model.feature_spec.shape, generator=generator).abs()
    latents = torch.randn(2, *model.latent_shape, generator=generator)
    return model, features, latents


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_ddim_matches_the_diffusers_recipe(setup):
    model, features, latents = setup
    scheduler = DDIMScheduler.from_config(model.noise_schedule.to_dict())
    expected = diffusers_recipe(model, features, latents, scheduler, steps=50, guidance_scale=1.75)
    ours = Reconstructor(model).reconstruct(
        features=features, latents=latents, steps=50, guidance_scale=1.75, progress=False
    )
    # Our schedule tables are double precision, diffusers' are float32 (its alphas_cumprod is a
    # float32 cumprod), so the two loops round differently in the last bit of each coefficient. A
    # random tiny UNet drives samples to |x| ~ 50, where that is ~5e-5 absolute: the bound is
    # 1e-5 at unit scale, i.e. 1e-5 * max(1, |x|max).
    scale = max(1.0, float(expected.abs().max()))
    assert (ours.samples - expected).abs().max() <= 1e-5 * scale
    # The condition matters: other features give a clearly different result.
    other = Reconstructor(model).reconstruct(features=features.flip(0), latents=latents, steps=50, progress=False)
    assert (other.samples - ours.samples).abs().max() > 1e-2


def test_dpmpp_matches_the_diffusers_recipe(setup):
    model, features, latents = setup
    scheduler = DPMSolverMultistepScheduler.from_config(
        {**model.noise_schedule.to_dict(), "timestep_spacing": "linspace"}
    )
    expected = diffusers_recipe(model, features, latents, scheduler, steps=20, guidance_scale=1.75)
    ours = Reconstructor(model).reconstruct(
        features=features, latents=latents, steps=20, sampler="dpmpp", progress=False
    )
    # diffusers keeps its sigmas in float32, ours are double: agreement to float32 rounding.
    scale = max(1.0, float(expected.abs().max()))
    assert (ours.samples - expected).abs().max() <= 1e-5 * scale


def test_one_denoiser_step_is_bit_identical_to_the_recipe(setup):
    """Everything except the scheduler's float32 arithmetic agrees exactly: eps with guidance."""
    model, features, latents = setup
    reconstructor = Reconstructor(model)
    denoise = reconstructor.guided_denoiser(features, 1.75)
    controlnet, condition, context = recipe_parts(model, features)
    with torch.no_grad():
        expected = recipe_eps(model, controlnet, latents, torch.tensor(981), condition, context, 1.75)
        assert torch.equal(denoise(latents, 981), expected)


@pytest.mark.heavy
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_trained_tiny_model_matches_the_recipe_to_1e_5(sampler):
    """On a trained tiny model (the shipped shapes-demo one), samples stay at their natural scale
    (|x| <= ~2) and the loops agree to 1e-5 absolute in fp32."""
    from featinv import FeatInvModel
    from featinv.data.shapes import generate_shapes
    from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR

    model = FeatInvModel.from_pretrained(PRETRAINED / SPATIAL_DIR)
    reconstructor = Reconstructor(model)
    features = reconstructor.features(generate_shapes(2, 99).images)
    latents = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    if sampler == "ddim":
        scheduler, steps = DDIMScheduler.from_config(model.noise_schedule.to_dict()), 50
    else:
        config = {**model.noise_schedule.to_dict(), "timestep_spacing": "linspace"}
        scheduler, steps = DPMSolverMultistepScheduler.from_config(config), 20
    expected = diffusers_recipe(model, features, latents, scheduler, steps=steps, guidance_scale=1.75)
    ours = reconstructor.reconstruct(features=features, latents=latents, steps=steps, sampler=sampler, progress=False)
    assert float(expected.abs().max()) < 4.0
    assert (ours.samples - expected).abs().max() <= 1e-5
