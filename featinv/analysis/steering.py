"""Concept steering (the paper's FeatInv-Viz): move a feature map along a concept direction, with a
series of strengths, everywhere or inside a mask, and reconstruct what the classifier would see.

A direction is a class's weight vector in the classifier's linear head (for the penultimate map), or
a concept activation vector (CAV): the normal of a linear classifier separating the pooled feature
maps of concept images from those of other images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor

MAX_STRENGTH = 50.0


@dataclass
class Concept:
    """A unit direction (C,) in channel space and how to score it on images: the classifier's
    probability of ``class_index``, or the CAV probe ``sigmoid(probe_weight . pooled + probe_bias)``."""

    direction: torch.Tensor
    name: str
    class_index: int | None = None
    probe_weight: torch.Tensor | None = None
    probe_bias: float = 0.0

    def probability(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        """(B,) probability of the concept on images (B, 3, H, W)."""
        with torch.no_grad():
            if self.class_index is not None:
                return extractor.logits(images).softmax(1)[:, self.class_index].cpu()
            pooled = extractor._features(extractor.preprocess(images)).mean((2, 3))
            return torch.sigmoid(pooled.cpu() @ self.probe_weight + self.probe_bias)


def class_concept(extractor: FeatureExtractor, class_index: int) -> Concept:
    """The direction of class ``class_index`` in the classifier's linear head."""
    head = extractor.linear_head()
    channels = extractor.spec.channels
    if not isinstance(head, torch.nn.Linear) or head.in_features != channels:
        raise FeatInvError(
            f"class directions need a linear head over the {channels}-channel map; this classifier/layer "
            f"({extractor.spec.describe()}) has none: use a CAV from concept images instead"
        )
    if not 0 <= class_index < head.out_features:
        raise FeatInvError(f"class index must be in [0, {head.out_features - 1}], got {class_index}")
    weight = head.weight[class_index].detach().float().cpu()
    return Concept(weight / weight.norm(), f"class {class_index}", class_index=class_index)


def concept_activation_vector(
    concept: torch.Tensor, others: torch.Tensor, *, steps: int = 300, lr: float = 0.1, name: str = "concept"
) -> Concept:
    """A CAV from feature maps of concept images (N, C, h, w) and of other images (M, C, h, w):
    logistic regression on the pooled maps (standardised), seeded and full-batch."""
    if len(concept) == 0 or len(others) == 0:
        raise FeatInvError(f"a CAV needs concept and other examples, got {len(concept)} and {len(others)}")
    x = torch.cat([concept.mean((2, 3)), others.mean((2, 3))]).float().cpu()
    y = torch.cat([torch.ones(len(concept)), torch.zeros(len(others))])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raw = (weight / std).detach()  # the probe in unstandardised pooled-feature space
    return Concept(raw / raw.norm(), name, probe_weight=raw, probe_bias=float((bias - (mean / std) @ weight).detach()))


def steer(
    features: torch.Tensor, concept: Concept, strengths: list[float], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Feature maps (S, B, C, h, w): ``features`` (B, C, h, w) plus strength x the concept direction
    x the mean per-position feature norm, at every position, or inside ``mask`` (H, W) in [0, 1];
    clamped to the range of ``features``."""
    for s in strengths:
        if not -MAX_STRENGTH <= float(s) <= MAX_STRENGTH:
            raise FeatInvError(f"strengths must be in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {s}")
    if concept.direction.numel() != features.shape[1]:
        raise FeatInvError(f"the concept has {concept.direction.numel()} channels, the features {features.shape[1]}")
    scale = features.norm(dim=1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
    direction = concept.direction.to(features)[None, :, None, None]
    weight = torch.ones_like(features[:, :1])
    if mask is not None:
        weight = F.interpolate(mask.float()[None, None], size=features.shape[-2:], mode="area").to(features)
    steered = torch.stack([features + float(s) * scale * direction * weight for s in strengths])
    # Keep the map in the range the classifier can produce (e.g. >= 0 after a ReLU, <= 6 after ReLU6).
    return steered.clamp(float(features.min()), float(features.max()))
