"""Robustness probes: PGD adversarial examples against the classifier, common corruptions and
out-of-distribution inputs; their feature maps are then reconstructed to show what the classifier
"sees" in them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featinv.errors import FeatInvError
from featinv.features import FeatureExtractor, check_images

# ImageNet-C's 15 corruptions and its 4 extra ones (Hendrycks & Dietterich 2019), as the
# imagecorruptions package implements them; "jpeg" is featinv's earlier name for jpeg_compression.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate", "jpeg",
)  # fmt: skip
ALIASES = {"jpeg": "jpeg_compression"}


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
        logits = extractor.logits_normalized(extractor.normalize((images + delta).clamp(0, 1)))
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0, 1).detach().cpu()


def corrupt(images: torch.Tensor, name: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """An ImageNet-C corruption of ``images`` (B, 3, H, W) in [0, 1] at ``severity`` 1-5, by the
    ``imagecorruptions`` package (its definitions and severities, so figures compare with published
    ones; on 8-bit pictures, as it works). Image i is corrupted with numpy's global generator seeded
    ``seed + i`` (the package draws from it), which is restored afterwards."""
    check_images(images)
    if name not in CORRUPTIONS:
        raise FeatInvError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise FeatInvError(f"severity must be an integer in 1..5, got {severity!r}")
    if min(images.shape[-2:]) < 32:
        raise FeatInvError(f"common corruptions need images of at least 32x32 pixels, got {tuple(images.shape[-2:])}")
    try:
        from imagecorruptions import corrupt as imagenet_c
    except ImportError as error:
        raise FeatInvError("common corruptions need imagecorruptions: pip install 'featinv[metrics]'") from error
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    saved = np.random.get_state()
    out = []
    try:
        for i, picture in enumerate(pixels):
            np.random.seed((seed + i) % 2**32)
            corrupted = imagenet_c(picture, corruption_name=ALIASES.get(name, name), severity=severity)
            out.append(torch.from_numpy(np.array(corrupted[..., :3], dtype=np.uint8)))  # a writable copy
    finally:
        np.random.set_state(saved)
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


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
