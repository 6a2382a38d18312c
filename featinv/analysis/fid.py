"""Frechet distance between two image sets in the feature space of a pluggable network: the FID
Inception (pytorch-fid's architecture, the port of TensorFlow's that published FIDs use, with its
weights file ``pt_inception-2015-12-05-6726825d.pth`` given locally) for FID proper, otherwise the
classifier's own penultimate (pre-logits) features. The matrix square root is an eigendecomposition
in float64 (checked against ``scipy.linalg.sqrtm`` in the tests)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from featinv.analysis.intervals import LEVEL, percentile_interval
from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""images (B, 3, H, W) in [0, 1] -> vectors (B, D)."""


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of feature sets (N, D) and (M, D).

    The cross term's trace is the sum of the square roots of the eigenvalues of S_a S_b. With the
    centred sets A (N, D) and B (M, D) those are the squared singular values of A B^T (N, M) over
    (N - 1)(M - 1): with no more images than dimensions (64 images in Inception's 2048) the trace is
    the nuclear norm of A B^T, exact and without a D x D matrix; otherwise two D x D square roots.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise FeatInvError(f"feature sets must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise FeatInvError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b
    trace_a = centred_a.pow(2).sum() / (len(a) - 1)
    trace_b = centred_b.pow(2).sum() / (len(b) - 1)
    if max(len(a), len(b)) <= a.shape[1]:
        cross = torch.linalg.svdvals(centred_a @ centred_b.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    else:
        root_a = sqrtm_psd(torch.cov(a.T))
        cross = torch.trace(sqrtm_psd(root_a @ torch.cov(b.T) @ root_a))
    value = (mu_a - mu_b).pow(2).sum() + trace_a + trace_b - 2 * cross
    return float(value.clamp_min(0))


def fid_difference_interval(
    real: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, resamples: int = 200, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """The bootstrap interval of ``FD(real, a) - FD(real, b)`` for embeddings (M, D), (N, D), (N, D),
    where ``a[i]`` and ``b[i]`` come from the same image (two methods' reconstructions of it): the
    real set and the image indices are resampled, the same indices for both methods. One FD of
    resampled sets is biased (a resample repeats images); the difference's bias largely cancels,
    which is why only the difference gets an interval. Costs 2 x ``resamples`` FDs."""
    if a.shape != b.shape:
        raise FeatInvError(f"a and b must embed the same images, got {tuple(a.shape)} and {tuple(b.shape)}")
    generator = torch.Generator().manual_seed(seed)
    differences = []
    for _ in range(resamples):
        rows = torch.randint(len(real), (len(real),), generator=generator)
        images = torch.randint(len(a), (len(a),), generator=generator)
        differences.append(frechet_distance(real[rows], a[images]) - frechet_distance(real[rows], b[images]))
    return percentile_interval(torch.tensor(differences), level)


def classifier_features(extractor: FeatureExtractor) -> FeatureFn:
    """The classifier's penultimate (pre-logits) vector of each image."""

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        device = next(extractor.classifier.parameters()).device
        return extractor.pre_logits(images.to(device)).float().cpu()

    return features


def inception_features(weights: str | Path | dict[str, torch.Tensor]) -> FeatureFn:
    """pytorch-fid's FID Inception pool features (2048): its ``InceptionV3`` (resize to 299,
    inputs scaled to [-1, 1], the TensorFlow graph's blocks), with its weights from a local file
    (the ``.pth`` pytorch-fid downloads, read with ``weights_only``, or the same tensors as
    safetensors) instead of the URL it would fetch. Needs ``pytorch-fid`` (``featinv[metrics]``)."""
    from unittest import mock

    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as error:
        raise FeatInvError("FID in Inception space needs pytorch-fid: pip install 'featinv[metrics]'") from error
    from featinv.weights import load_state_dict

    state = weights if isinstance(weights, dict) else load_state_dict(weights, what="FID Inception weights")
    try:  # pytorch-fid fetches its weights from a URL: hand it the local file's tensors instead
        with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    except (RuntimeError, KeyError) as error:  # missing, unexpected or misshapen tensors
        first = str(error).strip().splitlines()[0][:200]
        raise FeatInvError(f"FID Inception weights {weights} do not fit pytorch-fid's InceptionV3 ({first})") from error

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return model(images.to(device, torch.float32))[0].flatten(1).float().cpu()

    return features


def embed_images(images: torch.Tensor, features: FeatureFn, batch_size: int = 64) -> torch.Tensor:
    """(N, D): ``features`` of images (N, 3, H, W), ``batch_size`` at a time (embed a reference set
    once, then compare many sets with :func:`frechet_distance`)."""
    return torch.cat([features(chunk) for chunk in images.split(batch_size)])


def fid(real: torch.Tensor, generated: torch.Tensor, features: FeatureFn, batch_size: int = 64) -> float:
    """FID between image sets (N, 3, H, W) and (M, 3, H, W) in the space of ``features``."""
    return frechet_distance(embed_images(real, features, batch_size), embed_images(generated, features, batch_size))
