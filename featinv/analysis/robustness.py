"""Robustness probes: PGD adversarial examples against the classifier, common corruptions and
out-of-distribution inputs; their feature maps are then reconstructed to show what the classifier
"sees" in them."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, check_images
from featinv.images import from_pil, to_pil

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "brightness", "pixelate")


def pgd_attack(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    *,
    eps: float = 4 / 255,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Untargeted L-inf PGD (Madry et al.): maximise the cross-entropy of the classifier's own
    prediction within ``eps`` of ``images`` (B, 3, H, W) in [0, 1], from a seeded random start."""
    check_images(images)
    if not 0 < eps <= 0.5 or steps < 1:
        raise FeatInvError(f"eps must be in (0, 0.5] and steps >= 1, got eps={eps}, steps={steps}")
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    device = next(extractor.classifier.parameters()).device
    images = images.to(device)
    with torch.no_grad():
        labels = extractor.logits(images).argmax(1)
    generator = torch.Generator().manual_seed(seed)
    delta = ((torch.rand(images.shape, generator=generator) * 2 - 1) * eps).to(device)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = extractor.classifier(extractor.normalize((images + delta).clamp(0, 1)))
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0, 1).detach().cpu()


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """A common corruption (after Hendrycks & Dietterich) of ``images`` (B, 3, H, W), severity 1-5."""
    check_images(images)
    if name not in CORRUPTIONS:
        raise FeatInvError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if not 1 <= severity <= 5:
        raise FeatInvError(f"severity must be in 1..5, got {severity}")
    level = severity / 5
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return (images + 0.2 * level * noise).clamp(0, 1)
    if name == "gaussian_blur":
        sigma = 0.5 + 2.5 * level
        radius = int(3 * sigma)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).to(images)
        padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
        out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3).clamp(0, 1)
    if name == "jpeg":
        quality = int(60 - 55 * level)
        out = []
        for image in images:
            buffer = io.BytesIO()
            to_pil(image).save(buffer, format="JPEG", quality=quality)
            with Image.open(buffer) as compressed:
                out.append(from_pil(compressed.convert("RGB")))
        return torch.stack(out)
    if name == "contrast":
        mean = images.mean((1, 2, 3), keepdim=True)
        return ((images - mean) * (1 - 0.8 * level) + mean).clamp(0, 1)
    if name == "brightness":
        return (images + 0.5 * level).clamp(0, 1)
    factor = max(2, int(2 + 6 * level))  # pixelate
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def ood_inputs(n: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Out-of-distribution inputs (n, 3, size, size): uniform noise, a checkerboard, smooth colour fields."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    periods = torch.randint(2, max(3, size // 4), (n,), generator=generator)
    checker = torch.stack([((yy // p + xx // p) % 2).float().expand(3, -1, -1) for p in periods.tolist()])
    low = torch.rand(n, 3, 4, 4, generator=generator)
    return {
        "uniform_noise": torch.rand(n, 3, size, size, generator=generator),
        "checkerboard": checker,
        "colour_field": F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1),
    }
