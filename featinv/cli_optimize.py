"""``featinv reconstruct --method optimize``: the optimisation baseline from the command line, on a
FeatInv model's classifier or, with ``--classifier NAME``, on any timm classifier without a model
(see :mod:`featinv.cli` for the conventions every command follows)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from featinv.cli import _parse_layer, _read_features, _sample_names, _unique_stems, staged_output

if TYPE_CHECKING:
    import torch


def optimize_images(extractor, maps: torch.Tensor, args: argparse.Namespace, seed: int) -> torch.Tensor:
    """The optimisation baseline at the classifier's input size, with a progress bar; prints the
    final feature cosine of the images it found."""
    import torch

    from featinv.analysis.metrics import feature_cosine
    from featinv.analysis.optimize import OptimizeConfig, invert_by_optimization

    config = OptimizeConfig.for_input(max(extractor.spec.input_size[1:]), args.opt_steps)
    images = invert_by_optimization(extractor, maps, config=config, seed=seed, progress=not args.quiet)
    device = next(extractor.classifier.parameters()).device
    with torch.no_grad():
        cosine = feature_cosine(extractor(images.to(device)).float(), maps.to(device).float())
    print(
        f"optimised {len(images)} image(s) at {images.shape[-2]}x{images.shape[-1]} px: feature cosine "
        + ", ".join(f"{float(c):.3f}" for c in cosine)
    )
    return images


def cmd_optimize(args: argparse.Namespace) -> int:
    """``reconstruct --method optimize --classifier NAME``: the optimisation baseline on any timm
    classifier and layer, no FeatInv model: images are brought to the classifier's input by its own
    eval transform, and optimised at that size."""
    from featinv.pipeline import resolve_device

    extractor = classifier_from_args(args).to(resolve_device(args.device))
    stems, originals, maps = classifier_inputs(extractor, args)
    runs = [optimize_images(extractor, maps, args, args.seed + k * len(stems)) for k in range(args.samples)]
    write_inversions(args, stems, originals, runs)
    print(f"wrote {len(stems)} optimisation inversion(s) of {extractor.spec.describe()} and grid.png to {args.out}")
    return 0


def classifier_from_args(args: argparse.Namespace, mode: str | None = None):
    """The ``--classifier NAME [--layer] [--input-size] [--classifier-weights]`` feature extractor."""
    from featinv.features import FeatureExtractor

    return FeatureExtractor(
        args.classifier,
        _parse_layer(args.layer),
        mode=mode or ("pooled" if args.pooled else "spatial"),
        weights=args.classifier_weights,
        input_size=(3, args.input_size, args.input_size) if args.input_size else None,
    )


def classifier_inputs(extractor, args: argparse.Namespace) -> tuple[list[str], torch.Tensor | None, torch.Tensor]:
    """(stems, originals (B, 3, H, W) at the classifier's input or None, feature maps (B, C, h, w))
    of ``--images`` (by the classifier's eval transform) or ``--features``."""
    import torch

    from featinv.images import load_images

    if args.images:
        originals = load_images(args.images, extractor.spec.input_size[1:], extractor.spec.crop_pct)
        with torch.no_grad():
            maps = extractor(originals.to(next(extractor.parameters()).device)).cpu()
        return _unique_stems(args.images), originals, maps
    maps = _read_features(args.features)
    extractor.spec.check_features(maps, "--features")
    return [f"features_{i:03d}" for i in range(len(maps))], None, maps


def write_inversions(
    args: argparse.Namespace, stems: list[str], originals: torch.Tensor | None, runs: list[torch.Tensor]
) -> None:
    """Write sample k of input ``stem`` as its :func:`featinv.cli._sample_names` file, and grid.png
    (originals, then one column per sample, the first 16 inputs) into ``--out``, atomically."""
    from featinv.images import make_grid, save_image

    names = _sample_names(stems, len(runs))
    with staged_output(args.out) as staging:
        for k, images in enumerate(runs):
            for stem, image in zip(stems, images, strict=True):
                save_image(image, staging / names[stem][k])
        columns = ([originals[:16]] if originals is not None else []) + [images[:16] for images in runs]
        save_image(make_grid(columns, scale=max(1, 128 // columns[0].shape[-1])), staging / "grid.png")
