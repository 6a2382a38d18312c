"""Metrics between originals and reconstructions: feature cosine, classifier agreement, object
location (mask IoU and centroid distance), PSNR and SSIM; and the spread of several samples of the
same feature maps. FID lives in :mod:`featinv.analysis.fid`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from featinv.features import FeatureExtractor


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened feature maps (B, C, h, w) x (B, C, h, w) -> (B,)."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def topk_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Whether b's top-1 class is among a's top-k classes: (B, N) x (B, N) -> (B,) bool. With N <= k
    classes every class is in the top k (always true)."""
    return (logits_a.topk(min(k, logits_a.shape[1]), dim=1).indices == logits_b.argmax(1, keepdim=True)).any(1)


def colour_masks(images: torch.Tensor, originals: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Object masks of images (B, 3, H, W) by colour: pixels nearer the original object's mean colour
    than the original background's mean colour. Returns (B, 1, H, W) in {0, 1}."""
    weight = masks.clamp(0, 1)
    fg = (originals * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)
    bg = (originals * (1 - weight)).sum((2, 3)) / (1 - weight).sum((2, 3)).clamp_min(1e-6)
    to_fg = (images - fg[:, :, None, None]).norm(dim=1, keepdim=True)
    to_bg = (images - bg[:, :, None, None]).norm(dim=1, keepdim=True)
    return (to_fg < to_bg).float()


def mask_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binarised masks (B, 1, H, W) -> (B,)."""
    p, t = predicted > 0.5, target > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def centroid_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance in pixels between the centroids of masks (B, 1, H, W) -> (B,)."""

    def centroid(m: torch.Tensor) -> torch.Tensor:
        h, w = m.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=m.dtype), torch.arange(w, dtype=m.dtype), indexing="ij")
        total = m.sum((1, 2, 3)).clamp_min(1e-6)
        return torch.stack([(m[:, 0] * ys).sum((1, 2)) / total, (m[:, 0] * xs).sum((1, 2)) / total], 1)

    return (centroid(predicted.float()) - centroid(target.float())).norm(dim=1)


SPREAD_MAX = 0.5  # the largest per-pixel standard deviation of values in [0, 1]


def sample_spread(samples: torch.Tensor) -> torch.Tensor:
    """How much K reconstructions of the same feature maps differ, per pixel: the standard deviation
    over the samples, averaged over RGB. (K, B, 3, H, W) in [0, 1] -> (B, H, W) in [0, SPREAD_MAX]. What the
    feature map pins down stays alike across samples (low spread); what it leaves open varies."""
    if samples.dim() != 5 or samples.shape[0] < 2:
        raise ValueError(f"samples must be (K >= 2, B, 3, H, W), got {tuple(samples.shape)}")
    return samples.float().std(dim=0, unbiased=False).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images (B, 3, H, W) in [0, 1] -> (B,)."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity as the field computes it (Wang et al. 2004: 11x11 Gaussian window,
    sigma 1.5, K1 0.01, K2 0.03, data range 1, per channel, averaged), by torchmetrics: (B, 3, H, W)
    x (B, 3, H, W) in [0, 1] -> (B,). Images under 11 pixels get the largest odd window that fits."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    window = min(11, (min(a.shape[-2:]) - 1) // 2 * 2 + 1)
    return structural_similarity_index_measure(
        a.float(), b.float(), gaussian_kernel=True, sigma=1.5, kernel_size=window, data_range=1.0, reduction="none"
    )


@torch.no_grad()
def classifier_outputs(extractor: FeatureExtractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial feature maps, logits) of images (B, 3, H, W) on the classifier's device: what
    :func:`reconstruction_metrics` compares (compute the originals' once for several methods).
    The logits are None for a model without class scores (an encoder such as DINOv2)."""
    device = next(extractor.classifier.parameters()).device
    images = images.cpu().to(device)
    # Features are always compared in the spatial map of the classifier, whatever the model's mode.
    logits = extractor.logits(images) if extractor.has_logits else None
    return extractor._features(extractor.preprocess(images)), logits


@torch.no_grad()
def reconstruction_metrics(
    extractor: FeatureExtractor,
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    original_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image metrics, each (B,) float on the CPU, of reconstructions (B, 3, H, W) against their
    originals: feature cosine in the classifier's spatial map and after pooling, top-1 and top-5
    agreement (where the classifier has class scores), PSNR, SSIM, and with object masks
    (B, 1, H, W) the colour-mask IoU and centroid distance. Callers average them (after merging
    shares, in a multi-process run).
    ``original_outputs``: :func:`classifier_outputs` of ``originals``, when the caller has them."""
    originals, reconstructions = originals.cpu(), reconstructions.cpu()
    f_orig, logits_orig = original_outputs or classifier_outputs(extractor, originals)
    f_rec, logits_rec = classifier_outputs(extractor, reconstructions)
    values = {
        "feature_cosine": feature_cosine(f_orig, f_rec),
        "pooled_feature_cosine": feature_cosine(f_orig.mean((2, 3), keepdim=True), f_rec.mean((2, 3), keepdim=True)),
        "psnr_db": psnr(reconstructions, originals),
        "ssim": ssim(reconstructions, originals),
    }
    if logits_orig is not None:
        values["top1_agreement"] = topk_agreement(logits_orig, logits_rec)
        values["top5_agreement"] = topk_agreement(logits_orig, logits_rec, k=5)
    if masks is not None:
        predicted = colour_masks(reconstructions, originals, masks)
        values["mask_iou"] = mask_iou(predicted, masks)
        values["centroid_distance_px"] = centroid_distance(predicted, masks)
    return {name: value.float().cpu().flatten() for name, value in values.items()}
