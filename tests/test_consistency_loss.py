"""The feature-consistency loss of ControlNet training (``FeatureConsistencyLoss``): zero for a perfect noise
prediction, blind to dropped and high-noise samples, and a gradient that reaches the ControlNet."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from featinv.data.streams import ShapesStream
from featinv.errors import FeatInvError
from featinv.training.feature_cache import OnlineFeatures
from featinv.training.loop import TrainConfig, alphas_table
from featinv.training.losses import FeatureConsistencyLoss
from featinv.training.train import train_controlnet


def _batch(model, extractor, t):
    """Clean shapes images, their feature maps, and x_t with the true noise for timesteps ``t``."""
    stream = ShapesStream(pool_size=16, seed=2, device=torch.device("cpu"), size=16)
    images, _ = stream.batch(0, len(t))
    noise = torch.randn((len(t), *model.latent_shape), generator=torch.Generator().manual_seed(0))
    alphas = alphas_table(model, torch.device("cpu"))
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * model.encode(images) + (1 - a).sqrt() * noise
    with torch.no_grad():
        maps = extractor(images)
    return alphas, x_t, noise, maps


def test_a_perfect_noise_prediction_has_no_consistency_loss(tiny_extractor):
    model = make_model(tiny_extractor)
    t = torch.tensor([5, 150, 390, 399])
    alphas, x_t, noise, maps = _batch(model, tiny_extractor, t)
    consistency = FeatureConsistencyLoss(tiny_extractor, weight=1.0, max_timestep=400)
    everyone = torch.ones(len(t), dtype=torch.bool)
    assert consistency.loss(model, alphas, x_t, t, noise, maps, everyone).item() < 1e-5
    # A wrong prediction does cost: the clean estimate is then another image.
    wrong = consistency.loss(model, alphas, x_t, t, torch.randn_like(noise), maps, everyone)
    assert wrong.item() > 1e-3


def test_dropped_and_high_noise_samples_do_not_count(tiny_extractor):
    model = make_model(tiny_extractor)
    t = torch.tensor([50, 50, 700, 50])
    alphas, x_t, noise, maps = _batch(model, tiny_extractor, t)
    conditioned = torch.tensor([True, False, True, True])
    consistency = FeatureConsistencyLoss(tiny_extractor, weight=0.5, max_timestep=400)
    eps = noise + 0.3 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    loss = consistency.loss(model, alphas, x_t, t, eps, maps, conditioned)
    # Sample 1 is dropped, sample 2 is above max_timestep: scrambling their maps changes nothing.
    scrambled = maps.clone()
    scrambled[1:3] = torch.randn_like(scrambled[1:3])
    assert torch.equal(loss, consistency.loss(model, alphas, x_t, t, eps, scrambled, conditioned))
    # The two kept samples, computed by hand: weight * mean(1 - cosine).
    a = alphas[t[[0, 3]]].view(-1, 1, 1, 1)
    x0 = (x_t[[0, 3]] - (1 - a).sqrt() * eps[[0, 3]]) / a.sqrt()
    cos = torch.nn.functional.cosine_similarity(tiny_extractor(model.decode(x0)).flatten(1), maps[[0, 3]].flatten(1))
    torch.testing.assert_close(loss, 0.5 * (1 - cos).mean())
    nobody = torch.zeros(len(t), dtype=torch.bool)
    assert consistency.loss(model, alphas, x_t, t, eps, maps, nobody).item() == 0.0


def test_the_consistency_loss_changes_what_the_controlnet_learns(tiny_extractor):
    def trained(consistency):
        model = make_model(tiny_extractor)
        stream = ShapesStream(pool_size=32, seed=3, device=torch.device("cpu"), size=16)
        config = TrainConfig(steps=3, lr=1e-3, batch_size=8, log_every=1)
        result = train_controlnet(model, OnlineFeatures(tiny_extractor), stream, config, consistency=consistency)
        return model.controlnet.state_dict(), result.losses

    plain, plain_losses = trained(None)
    with_consistency, losses = trained(FeatureConsistencyLoss(tiny_extractor, weight=1.0, max_timestep=1000))
    assert losses[0] > plain_losses[0]  # same batch, same noise: the added term is positive
    assert any(not torch.equal(plain[k], with_consistency[k]) for k in plain)
    assert not any(p.requires_grad for p in tiny_extractor.parameters())  # the classifier stays frozen


def test_consistency_rejects_bad_settings(tiny_extractor):
    with pytest.raises(FeatInvError, match=r"consistency weight \(--consistency-weight\) must be > 0"):
        FeatureConsistencyLoss(tiny_extractor, weight=0.0)
    with pytest.raises(FeatInvError, match=r"max_timestep \(--consistency-max-t\) must be a positive integer"):
        FeatureConsistencyLoss(tiny_extractor, max_timestep=0)
