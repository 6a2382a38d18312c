"""Classifiers for FeatInv models: accuracy on held-out images, with its interval, for the timm
classifiers ``featinv train-classifier`` trains on ``shapes`` or an image folder
(:func:`featinv.training.train.train_classifier` is the training loop)."""

from __future__ import annotations

import torch

from featinv.analysis.intervals import wilson_interval
from featinv.features import FeatureExtractor


@torch.no_grad()
def accuracy(
    extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> tuple[float, tuple[float, float]]:
    """Top-1 accuracy of the extractor's classifier on images (N, 3, H, W) in [0, 1] with labels (N,),
    and its 95% Wilson interval."""
    device = next(extractor.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = extractor.logits(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(images), wilson_interval(correct, len(images))
