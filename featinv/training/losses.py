"""Losses beside the noise-prediction one: the feature-consistency loss, which trains a ControlNet
towards images whose classifier features match its condition."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featinv.analysis.metrics import feature_cosine
from featinv.errors import FeatInvError, require_positive_int
from featinv.features import FeatureExtractor
from featinv.models.featinv_model import FeatInvModel


@dataclass(frozen=True)
class FeatureConsistencyLoss:
    """Feature-consistency loss for ControlNet training (as ControlNet++, Li et al. 2024): the one-step
    clean estimate x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) of each conditioned sample with
    t < ``max_timestep`` goes through the frozen ``extractor``, and ``weight * (1 - cosine)`` between
    its feature map and the conditioning map is added to the noise-prediction loss. It trains the
    ControlNet to produce images whose features match the condition, the quantity FeatInv is judged by;
    at large t the one-step estimate is a blur, hence the cut-off."""

    extractor: FeatureExtractor
    weight: float = 0.1
    max_timestep: int = 400

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise FeatInvError(f"consistency weight (--consistency-weight) must be > 0, got {self.weight!r}")
        require_positive_int("consistency max_timestep (--consistency-max-t)", self.max_timestep)

    def loss(
        self,
        model: FeatInvModel,
        alphas: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        maps: torch.Tensor,
        conditioned: torch.Tensor,
    ) -> torch.Tensor:
        """Scalar loss for a batch: x_t, eps (B, C, H, W), t (B,), maps (B, C', h, w), conditioned (B,)."""
        keep = (conditioned & (t < self.max_timestep)).nonzero().flatten()
        if len(keep) == 0:
            return x_t.new_zeros(())
        a = alphas[t[keep]].view(-1, 1, 1, 1)
        x0 = (x_t[keep] - (1 - a).sqrt() * eps[keep]) / a.sqrt()
        return self.of_samples(model, x0, maps[keep])

    def of_samples(self, model: FeatInvModel, x0: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``weight * (1 - cosine)`` between the feature maps of the images clean samples x0
        (B, C, H, W) decode to and the conditioning maps (B, C', h, w), averaged."""
        rebuilt = self.extractor.forward_normalized(self.extractor.normalize(model.decode(x0)))
        return self.weight * (1 - feature_cosine(rebuilt.float(), maps.float())).mean()
