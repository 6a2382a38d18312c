"""``featinv reconstruct``: images from feature maps by one of four methods: ``featinv`` (the
learned inverter), ``hybrid`` (the learned inverter's sampling refined by the classifier's gradients,
:mod:`featinv.analysis.hybrid`), ``guided`` (training-free: the model's base steered by the classifier's
gradients, :mod:`featinv.analysis.guided`; the model's ControlNet is not used, so an untrained model
from ``featinv create`` serves, and ``--classifier NAME`` inverts any timm classifier and layer) and
``optimize`` (the optimisation baseline on pixels, on a model's classifier or, with ``--classifier
NAME``, on any timm classifier without a model), each from the one registry of
:mod:`featinv.analysis.methods`. See :mod:`featinv.cli.options` for what the commands share."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the commands that run, not by --help
    import torch

from featinv.choices import BACKENDS, DISTANCES, DTYPES, METHODS, SAMPLERS
from featinv.cli.options import (
    add_dtype_arg,
    add_guidance_on_arg,
    add_source_args,
    add_twin_encoder_arg,
    extractor_for,
    fast_options,
    load_model,
    new_extractor,
    only_with,
    read_features,
    required_extractor,
    sample_names,
    staged_output,
    torch_dtype,
    unique_stems,
)
from featinv.errors import FeatInvError
from featinv.limits import arg


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct images from the feature maps of image files (or a features file) by the
    registered ``--method`` (:mod:`featinv.analysis.methods`), one or several samples each (with
    the samples' per-pixel spread); under ``accelerate launch`` / ``torchrun`` each process takes a
    contiguous share, seeded by global index."""
    import torch

    from featinv.analysis.methods import InversionSettings, inversion_method
    from featinv.analysis.metrics import SPREAD_MAX, sample_spread
    from featinv.distributed import barrier, shard
    from featinv.images import heatmap, load_images, make_grid, save_image

    if args.images is None and args.features is None:
        raise FeatInvError("give --images FILES... or --features FILE")
    method = inversion_method(args.method)
    method.check(backend=args.backend, guidance=args.guidance_on is not None)
    model, extractor, reconstructor = _inverting(args, method)
    spec = reconstructor.spec if reconstructor is not None else extractor.spec
    if reconstructor is not None:
        reconstructor.sampling_defaults(args.steps, args.guidance, args.sampler)  # refuse a mismatch before any work
    guided = method.name == "guided"
    settings = InversionSettings(
        steps=args.steps,
        sampler=args.sampler,
        guidance_scale=args.guidance,
        guidance=args.guidance_on,
        eta=args.eta,
        hybrid=hybrid_from_args(args, model) if method.name == "hybrid" else None,
        guided=guidance_from_args(args, pooled=args.pooled or spec.mode == "pooled") if guided else None,
        opt_steps=args.opt_steps,
    )
    invert = method.inverter(reconstructor, model=model, extractor=extractor, device=args.device, settings=settings)
    size = spec.input_size[1:]
    if args.images:
        first, paths = shard(args.images)
        every_stem = unique_stems(args.images)
        originals, features = (load_images(paths, size, spec.crop_pct) if paths else None), None
    else:
        every = read_features(args.features)
        if reconstructor is None:
            spec.check_features(every, "--features")
        first, paths = shard(range(len(every)))
        every_stem = [f"features_{i:03d}" for i in range(len(every))]
        originals, features = None, every[first : first + len(paths)]
    stems = every_stem[first : first + len(paths)]
    samples = args.samples
    names = sample_names(every_stem, samples)
    runs = []  # per sample: (images, 3, H, W); sample k of image i is seeded seed + k * N + i
    if stems:
        maps = _features_of(originals, reconstructor, extractor, args.pooled) if originals is not None else features
    for k in range(samples if stems else 0):
        images = invert(
            maps,
            seed=args.seed + k * len(every_stem),
            first_index=first,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        if method.name == "optimize":
            _print_feature_cosine(extractor, images, maps)
        runs.append(images)
    if stems:
        with staged_output(args.out) as staging:
            for k, images in enumerate(runs):
                for stem, image in zip(stems, images, strict=True):
                    save_image(image, staging / names[stem][k])
            if samples > 1:
                spreads = heatmap(sample_spread(torch.stack(runs)), high=SPREAD_MAX)
                for stem, spread in zip(stems, spreads, strict=True):
                    save_image(spread, staging / names[stem][-1])
    barrier()
    if first == 0:  # the process with the first share merges: the grid of the first 16 of all
        shown = every_stem[:16]
        image_size = tuple(runs[0].shape[-2:])
        columns = [load_images([Path(args.out) / names[stem][k] for stem in shown], image_size) for k in range(samples)]
        if samples > 1:
            columns.append(load_images([Path(args.out) / names[stem][-1] for stem in shown], image_size))
        if args.images:
            columns.insert(0, load_images(args.images[: len(shown)], size, spec.crop_pct))
        with staged_output(args.out) as staging:
            save_image(make_grid(columns, scale=max(1, 128 // columns[0].shape[-1])), staging / "grid.png")
        print(f"wrote {_what(method.name, len(every_stem), samples, spec, settings)} and grid.png to {args.out}")
    return 0


def _inverting(args: argparse.Namespace, method):
    """(model or None, classifier or None, FeatInv's Reconstructor or None) that ``--method`` runs on,
    as the command line names them; refuses a combination it cannot run, in one line."""
    from featinv.pipeline import Reconstructor, resolve_device

    names_classifier = _names_classifier(args)
    if args.model is None:
        if method.needs_model and not method.uses_controlnet:
            method.check(model=False)  # guided: names what model serves
        if method.needs_model or not names_classifier:
            raise FeatInvError("give --model DIR, or --method optimize --classifier NAME (no FeatInv model needed)")
    elif names_classifier and not (method.needs_model and not method.uses_controlnet):
        raise FeatInvError("--classifier goes without --model (the model names its classifier)")
    device = resolve_device(args.device)
    model = load_model(args.model, args.trust_code) if args.model is not None else None
    if names_classifier:  # guided (the model's base only) or optimize (no model): any classifier
        mode = "spatial" if model is not None else None
        return model, classifier_from_args(args, mode=mode).to(device), None
    if method.needs_classifier:
        extractor = required_extractor(model, args.classifier_weights, args.model, args.trust_code)
    else:
        extractor = extractor_for(model, args.classifier_weights, args.trust_code)
    if not method.uses_controlnet:
        return model, extractor.to(device), None
    dtype = torch_dtype(args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32"))
    reconstructor = Reconstructor(
        model,
        extractor=extractor,
        device=device,
        dtype=dtype,
        backend=args.backend,
        engine_dir=args.engine_dir,
        fast_options=fast_options(args.twin_encoder, args.backend),
    )
    return reconstructor.model, reconstructor.extractor, reconstructor


def _features_of(images: torch.Tensor, reconstructor, extractor, pooled: bool) -> torch.Tensor:
    """The (B, C, h, w) maps of (B, 3, H, W) ``images`` to invert (``pooled``: their means tiled)."""
    import torch

    from featinv.features import pool_and_tile

    if reconstructor is not None:
        return reconstructor.features(images, pooled=pooled)
    with torch.no_grad():
        maps = extractor(images.to(next(extractor.parameters()).device)).cpu()
    return pool_and_tile(maps) if pooled and extractor.spec.mode == "spatial" else maps


def _print_feature_cosine(extractor, images: torch.Tensor, maps: torch.Tensor) -> None:
    """The optimisation baseline's report: the feature cosine of the images it found."""
    import torch

    from featinv.analysis.metrics import feature_cosine

    device = next(extractor.classifier.parameters()).device
    with torch.no_grad():
        cosine = feature_cosine(extractor(images.to(device)).float(), maps.to(device).float())
    print(
        f"optimised {len(images)} image(s) at {images.shape[-2]}x{images.shape[-1]} px: feature cosine "
        + ", ".join(f"{float(c):.3f}" for c in cosine)
    )


def _what(method: str, n: int, samples: int, spec, settings) -> str:
    """What ``reconstruct`` wrote, for its closing line."""
    if method == "guided":
        config = settings.guided
        what = (
            f"{n} guided inversion(s) of {spec.describe()} ({config.steps} {config.sampler} steps, strength "
            f"{config.strength:g}, {config.inner_steps} inner steps; no ControlNet)"
        )
    elif method == "optimize":
        what = f"{n} optimisation inversion(s) of {spec.describe()}"
    else:
        what = f"{n} reconstruction{'s' * (n != 1)}"
    if samples > 1:
        what += f", {samples} samples each, their spread maps (per-pixel std over the samples, 0 to 0.5)"
    if method == "hybrid":
        config = settings.hybrid
        what += (
            f" refined by feature guidance (strength {config.strength:g}, {config.inner_steps} inner steps, "
            f"the steps from {config.start:g} to {config.stop:g} of the way)"
        )
    return what


# ----- --method guided and hybrid


def add_guided_args(parser: argparse.ArgumentParser) -> None:
    """The guidance options of ``reconstruct --method guided|hybrid`` (their defaults are
    :class:`featinv.analysis.guided.GuidanceConfig`'s and :class:`featinv.analysis.hybrid.HybridConfig`'s;
    not imported here, to keep start-up light)."""
    group = parser.add_argument_group(
        "with --method guided (training-free, on the model's base) or hybrid (FeatInv's sampling refined); "
        "defaults guided | hybrid"
    )
    group.add_argument(
        "--strength",
        type=arg("strength"),
        help="forward guidance strength, 0 = the unguided samples (0.3 | 0.05; a distilled model: 0.001)",
    )
    group.add_argument(
        "--inner-steps",
        type=arg("inner_steps"),
        help="backward-guidance gradient steps on the clean estimate per step (2 | 0; a distilled model: 3)",
    )
    group.add_argument(
        "--inner-step-size",
        type=arg("step_size"),
        help="RMS change of the clean estimate per inner step (0.01 | 0.01; a distilled model: 0.003)",
    )
    group.add_argument("--distance", choices=DISTANCES, help="the feature distance to lower (cosine)")


def hybrid_from_args(args: argparse.Namespace, model):
    """The :class:`HybridConfig` the command line asks for: ``model``'s defaults
    (:meth:`HybridConfig.for_model`) where an option is not given."""
    from featinv.analysis.hybrid import HybridConfig

    options = ("strength", "inner_steps", "inner_step_size", "distance")
    given = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    return replace(HybridConfig.for_model(model), **given, pooled=args.pooled)


def guidance_from_args(args: argparse.Namespace, *, pooled: bool):
    """The :class:`GuidanceConfig` the command line asks for, its defaults where an option is not
    given (``--steps`` 20, ``--guidance`` 1: off); ``pooled``: match the maps' means."""
    from featinv.analysis.guided import GuidanceConfig

    options = {"strength", "inner_steps", "inner_step_size", "distance", "steps", "guidance", "sampler"}
    given = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    if "guidance" in given:
        given["guidance_scale"] = given.pop("guidance")
    return GuidanceConfig(**given, pooled=pooled)


def _names_classifier(args: argparse.Namespace) -> bool:
    return args.classifier is not None or args.classifier_module is not None


def classifier_from_args(args: argparse.Namespace, mode: str | None = None):
    """The ``--classifier NAME`` (``--source``, ``--classifier-module``, ``--layer``, ``--input-size``,
    ``--classifier-weights``, ``--classifier-kwargs``) feature extractor."""
    return new_extractor(
        args.source,
        args.classifier,
        args.classifier_module,
        layer=args.layer,
        mode=mode or ("pooled" if args.pooled else "spatial"),
        weights=args.classifier_weights,
        kwargs_text=args.classifier_kwargs,
        input_side=args.input_size,
        normalization_text=args.classifier_normalization,
    )


def add_reconstruct_command(commands) -> None:
    """Register ``reconstruct`` (every method of :mod:`featinv.analysis.methods`)."""
    rec = commands.add_parser("reconstruct", help="reconstruct images from feature maps")
    rec.add_argument("--model", help="FeatInv model folder (not needed with --method optimize --classifier NAME)")
    rec.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    rec.add_argument(
        "--classifier",
        help="a classifier (a timm name; see --source): with --method optimize (no --model) or --method guided",
    )
    add_source_args(rec, applies="with --classifier: ")
    rec.add_argument(
        "--classifier-kwargs",
        help="with --classifier: JSON of extra constructor arguments (transformers: config fields)",
    )
    rec.add_argument(
        "--layer",
        help="with --classifier: timm: forward_features (default), a feature_info index or a module; torchvision "
        "and modules: a module path; transformers: a hidden-state index or last",
    )
    rec.add_argument(
        "--input-size", type=arg("input_size"), help="with --classifier: its input side in pixels (default: its own)"
    )
    rec.add_argument("--images", nargs="+", help="image files whose feature maps to invert")
    rec.add_argument("--features", help="a safetensors file with a 'features' tensor (B, C, h, w)")
    rec.add_argument("--out", required=True, help="output folder (one PNG per input and grid.png)")
    rec.add_argument("--steps", type=arg("steps"), help="sampler steps (default 50; 20 with --method guided)")
    rec.add_argument(
        "--guidance",
        type=arg("guidance"),
        help="classifier-free guidance scale (default 1.75; 1, off, with --method guided)",
    )
    rec.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="ddim (the default) or dpmpp; lcm for a consistency-distilled model (a distilled model's default: "
        "its own few-step sampler)",
    )
    rec.add_argument("--eta", type=arg("eta"), default=0.0, help="DDIM eta in [0, 1] (default 0)")
    rec.add_argument("--seed", type=arg("seed"), default=0)
    rec.add_argument(
        "--samples",
        type=arg("samples"),
        default=1,
        help="reconstructions per input from different noise (default 1); with more, also each input's "
        "spread map: what the feature map leaves open varies between samples",
    )
    rec.add_argument("--batch-size", type=arg("batch_size"), default=8)
    rec.add_argument("--pooled", action="store_true", help="condition on pooled features (the paper's baseline)")
    rec.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_dtype_arg(rec, ["auto", *DTYPES], "auto", "the denoiser's dtype; auto: fp16 on a GPU, fp32 on the CPU")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument(
        "--method",
        choices=METHODS,
        default="featinv",
        help="featinv (diffusion), hybrid (featinv's sampling refined by the classifier's gradients), optimize "
        "(the Mahendran-Vedaldi baseline) or guided (the model's base alone, steered by the classifier's "
        "gradients); the last two need no training",
    )
    rec.add_argument(
        "--opt-steps", type=arg("opt_steps"), help="with --method optimize: Adam steps (default 300, 1000 above 160 px)"
    )
    rec.add_argument(
        "--backend",
        choices=BACKENDS,
        default="eager",
        help="denoiser backend (fast: CUDA only)",
    )
    rec.add_argument("--engine-dir", help="ONNX export / TensorRT engine cache (default: under ~/.cache/featinv)")
    add_twin_encoder_arg(rec)
    add_guidance_on_arg(rec)
    add_guided_args(rec)
    rec.set_defaults(func=cmd_reconstruct)
    with_classifier = ("--classifier NAME", _names_classifier)
    guided = ("--method guided or hybrid", lambda args: args.method in ("guided", "hybrid"))
    only_with(
        rec,
        {
            "--layer": with_classifier,
            "--input-size": with_classifier,
            "--source": with_classifier,
            "--classifier-kwargs": with_classifier,
            "--classifier-normalization": with_classifier,
            "--opt-steps": ("--method optimize", lambda args: args.method == "optimize"),
            "--strength": guided,
            "--inner-steps": guided,
            "--inner-step-size": guided,
            "--distance": guided,
            "--eta": ("--sampler ddim", lambda args: args.sampler in (None, "ddim")),
        },
    )
