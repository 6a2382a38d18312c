"""``featinv steer | compose | robustness | evaluate``: the CLI of :mod:`featinv.analysis` (see
:mod:`featinv.cli` for the conventions every command follows)."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the commands that run, not by --help
    import torch

from featinv.choices import METHODS, ODE_SAMPLERS
from featinv.cli.options import add_guidance_on_arg, load_model, only_with, required_extractor
from featinv.errors import FeatInvError
from featinv.limits import arg


def _analysis_reconstructor(args: argparse.Namespace, model_path: str | None = None):
    from featinv.pipeline import Reconstructor, resolve_device

    folder = model_path or args.model
    model = load_model(folder, args.trust_code)
    extractor = required_extractor(model, args.classifier_weights, folder, args.trust_code)
    return Reconstructor(model, extractor=extractor, device=resolve_device(args.device))


def _inverter(args: argparse.Namespace, reconstructor):
    from featinv.analysis.studies import make_inverter

    return make_inverter(
        reconstructor, args.method, steps=args.steps, sampler=args.sampler, seed=args.seed, opt_steps=args.opt_steps
    )


def _analysis_images(args: argparse.Namespace, reconstructor, *, same_size: bool = False) -> torch.Tensor:
    """--images FILES (resized to the model's image size) or --shapes N held-out shapes images."""
    from featinv.images import load_images

    size = reconstructor.model.image_size
    if args.images:
        if same_size:
            from PIL import Image

            sizes = set()
            for path in args.images:
                try:
                    with Image.open(path) as image:
                        sizes.add(image.size)
                except OSError as error:
                    raise FeatInvError(f"{path} is not a readable image ({error})") from error
            if len(sizes) > 1:
                raise FeatInvError(f"--images must all have the same size, got {sorted(sizes)}")
        return load_images(args.images, size, reconstructor.spec.crop_pct)
    from featinv.data.shapes import DEMO_SEED, generate_shapes

    if args.shapes < 1:
        raise FeatInvError(f"--shapes must be >= 1, got {args.shapes}")
    images = generate_shapes(args.shapes, DEMO_SEED, size=size[0]).images
    return images


def _load_mask(path: str | None, size: tuple[int, int]) -> torch.Tensor | None:
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except OSError as error:
        raise FeatInvError(f"--mask {path} is not a readable image ({error})") from error
    if grey.size[::-1] != tuple(size):
        raise FeatInvError(
            f"--mask must be {size[1]}x{size[0]} pixels like the images, got {grey.size[0]}x{grey.size[1]}"
        )
    from featinv.images import from_pil

    return from_pil(grey)[0]


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise FeatInvError(f"{name} must be comma-separated numbers, got {text!r}") from error
    if not values or not all(math.isfinite(v) for v in values):
        raise FeatInvError(f"{name} must be comma-separated finite numbers, got {text!r}")
    return values


def _channels(text: str) -> list[int]:
    channels: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            channels += list(range(int(low), int(high or low) + 1))
    except ValueError as error:
        raise FeatInvError(f"--channels must look like 0-63,100, got {text!r}") from error
    return channels


def cmd_steer(args: argparse.Namespace) -> int:
    """Steer feature maps toward a class or a concept (CAV) and reconstruct a strip of strengths."""
    from featinv.analysis.steering import class_concept, concept_activation_vector
    from featinv.analysis.studies import steer_study
    from featinv.data.image_folder import EXTENSIONS
    from featinv.images import load_images

    strengths = _floats(args.strengths, "--strengths")
    reconstructor = _analysis_reconstructor(args)
    images = _analysis_images(args, reconstructor)
    if (args.class_index is None) == (args.concept_dir is None):
        raise FeatInvError("give exactly one of --class K or --concept-dir DIR (with --others-dir DIR)")
    if args.class_index is not None:
        concept = class_concept(reconstructor.extractor, args.class_index)
    else:
        folders = {"--concept-dir": args.concept_dir, "--others-dir": args.others_dir}
        examples = {}
        for flag, folder in folders.items():
            files = sorted(p for p in Path(folder or "").glob("*") if p.suffix.lower() in EXTENSIONS) if folder else []
            if not files:
                raise FeatInvError(f"{flag} {folder} holds no images (.png, .jpg, ...)")
            examples[flag] = reconstructor.features(
                load_images(files, reconstructor.spec.input_size[1:], reconstructor.spec.crop_pct)
            )
        concept = concept_activation_vector(
            examples["--concept-dir"], examples["--others-dir"], name=Path(args.concept_dir).name
        )
    mask = _load_mask(args.mask, images.shape[-2:])
    data = steer_study(reconstructor, images, concept, strengths, Path(args.out), _inverter(args, reconstructor), mask)
    means = [sum(p) / len(p) for p in data["probability"]]
    print("p(concept) by strength: " + ", ".join(f"{s:g}: {p:.3f}" for s, p in zip(strengths, means, strict=True)))
    print(f"wrote strip.png, probability.png, metrics.json and report.html to {args.out}")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Interpolate, mask-mix or channel-select two images' feature maps and reconstruct them."""
    from featinv.analysis.studies import compose_study

    if not args.images or len(args.images) != 2:
        raise FeatInvError("--images takes exactly two image files (a and b)")
    reconstructor = _analysis_reconstructor(args)
    images = _analysis_images(args, reconstructor, same_size=True)
    mask = _load_mask(args.mask, images.shape[-2:])
    ts = _floats(args.ts, "--ts") if args.ts else None
    channels = _channels(args.channels) if args.channels else None
    compose_study(
        reconstructor,
        images[:1],
        images[1:],
        Path(args.out),
        _inverter(args, reconstructor),
        mode=args.mode,
        ts=ts,
        mask=mask,
        channels=channels,
    )
    print(f"wrote originals.png, grid.png, metrics.json and report.html to {args.out}")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    """Reconstruct from adversarial, corrupted and out-of-distribution inputs."""
    from featinv.analysis.robustness import CORRUPTIONS
    from featinv.analysis.studies import robustness_study

    corruptions = args.corruptions.split(",") if args.corruptions else None
    for name in corruptions or []:
        if name not in CORRUPTIONS:
            raise FeatInvError(f"--corruptions must be among {', '.join(CORRUPTIONS)}, got {name!r}")
    if not 0 < args.eps <= 0.5:
        raise FeatInvError(f"--eps must be in (0, 0.5], got {args.eps}")
    reconstructor = _analysis_reconstructor(args)
    images = _analysis_images(args, reconstructor)
    data = robustness_study(
        reconstructor,
        images,
        Path(args.out),
        _inverter(args, reconstructor),
        eps=args.eps,
        corruptions=corruptions,
        severity=args.severity,
        seed=args.seed,
    )
    for name, row in data["table"].items():
        print(
            f"{name:>24}: keeps the clean class {row['input_keeps_clean_class']:.2f}, "
            f"reconstruction agrees {row['reconstruction_agrees_with_input']:.2f}"
        )
    print(f"wrote grid.png, metrics.json and report.html to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """FeatInv spatial, FeatInv pooled, the optimisation baseline, guided and hybrid sampling side by side."""
    import torch

    from featinv.analysis.guided import GuidanceConfig
    from featinv.analysis.hybrid import HybridConfig
    from featinv.analysis.studies import evaluate_study
    from featinv.training.demo_preset import POOLED_DIR, PRETRAINED, SPATIAL_DIR

    if args.n < 2:
        raise FeatInvError(f"--n must be >= 2 (FID needs two images), got {args.n}")
    guided = None
    if not args.no_guided:
        given = {"steps": args.guided_steps, "strength": args.guided_strength}
        guided = GuidanceConfig(**{key: value for key, value in given.items() if value is not None})
    model_path = args.model or str(PRETRAINED / SPATIAL_DIR)
    pooled_path = args.pooled_model or (str(PRETRAINED / POOLED_DIR) if args.model is None else None)
    spatial = _analysis_reconstructor(args, model_path)
    hybrid = None
    if not args.no_hybrid:
        hybrid = HybridConfig.for_model(spatial.model)
        if args.hybrid_strength is not None:
            hybrid = replace(hybrid, strength=args.hybrid_strength)
    pooled = _analysis_reconstructor(args, pooled_path) if pooled_path else None
    size = spatial.model.image_size
    masks = None
    if args.data == "shapes":
        from featinv.data.shapes import DEMO_SEED, REAL_SEED, generate_shapes

        held_out = generate_shapes(args.n, DEMO_SEED, size=size[0])
        images, masks = held_out.images, held_out.masks
        real = generate_shapes(args.n, REAL_SEED, size=size[0]).images
    else:
        from featinv.data.image_folder import ImageFolderStream

        stream = ImageFolderStream(args.data, size[0], augment=False)
        if len(stream) < 2 * args.n:
            raise FeatInvError(f"--data {args.data} has {len(stream)} images; --n {args.n} needs {2 * args.n}")
        order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(args.seed))
        flips = torch.zeros(args.n, dtype=torch.bool)
        images, _ = stream.take(order[: args.n], flips)
        real, _ = stream.take(order[args.n : 2 * args.n], flips)
    fid_features = None
    if args.fid_weights:
        from featinv.analysis.fid import inception_features

        fid_features = inception_features(args.fid_weights)
    data = evaluate_study(
        spatial,
        pooled,
        images,
        real,
        Path(args.out),
        masks=masks,
        steps=args.steps,
        sampler=args.sampler,
        opt_steps=args.opt_steps,
        guided=guided,
        seed=args.seed,
        fid_features=fid_features,
        guidance=args.guidance_on if args.guidance_on != "both" else "features",
        compare_guidance="prompt" if args.guidance_on == "both" else None,
        hybrid=hybrid,
    )
    from featinv.analysis.intervals import format_interval
    from featinv.analysis.report import text_table

    methods = list(data["methods"])
    rows = [["", *methods]]
    for metric in data["methods"][methods[0]]:
        cells = []
        for name in methods:
            value, interval = data["methods"][name][metric], data["ci95"][name].get(metric)
            cells.append(format_interval(value, interval) if interval else f"{value:.3f}")
        rows.append([metric, *cells])
    print(f"{data['images']} images; mean [95% confidence interval]")
    print(text_table(rows))
    for line in data["verdicts"]:
        print(line)
    if "guidance_comparison" in data:
        comparison = data["guidance_comparison"]
        print(f"paired differences, {comparison['of']} minus {comparison['minus']}:")
        for metric, row in comparison.items():
            if isinstance(row, dict):
                shown = format_interval(row["value"], row["ci95"]) if row["ci95"] else f"{row['value']:.3f}"
                print(f"  {metric}: {shown}")
    classifier_size = tuple(spatial.spec.input_size[1:])
    if tuple(size) != classifier_size:
        print(
            f"note: every method, the optimisation baseline included, is compared at the model's image size "
            f"{size[0]}x{size[1]}, not the classifier's input {classifier_size[0]}x{classifier_size[1]} "
            "(reconstruct --method optimize runs at the classifier's)"
        )
    print(f"wrote grid.png, metrics.png, metrics.json and report.html to {args.out}")
    return 0


def _add_analysis_args(parser: argparse.ArgumentParser, *, model_required: bool = True, images: bool = True) -> None:
    from featinv.paths import PRETRAINED, SPATIAL_DIR

    default = None if not model_required else str(PRETRAINED / SPATIAL_DIR)
    parser.add_argument("--model", default=default, help="FeatInv model folder (default: the shipped demo model)")
    parser.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    if images:
        parser.add_argument("--images", nargs="+", help="image files (default: --shapes held-out shapes images)")
        parser.add_argument(
            "--shapes", type=arg("images"), default=4, help="without --images: this many held-out shapes images"
        )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="featinv",
        help="featinv, hybrid (featinv refined by feature guidance), optimize (the Mahendran-Vedaldi baseline) or "
        "guided (the base alone, training-free)",
    )
    parser.add_argument("--steps", type=arg("steps"), default=10, help="sampler steps (default 10)")
    parser.add_argument("--sampler", choices=ODE_SAMPLERS, default="dpmpp")
    parser.add_argument("--opt-steps", type=arg("opt_steps"), help="steps of the optimisation baseline")
    parser.add_argument("--seed", type=arg("seed"), default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)


def add_analysis_commands(commands) -> None:
    """Register the analysis commands on the ``featinv`` sub-parsers."""
    steer = commands.add_parser("steer", help="steer feature maps toward a class or concept; reconstruct a strip")
    _add_analysis_args(steer)
    steer.add_argument(
        "--class", dest="class_index", type=arg("class_index"), help="a class index of the classifier's head"
    )
    steer.add_argument("--concept-dir", help="images of the concept (for a CAV)")
    steer.add_argument("--others-dir", help="other images (for a CAV)")
    steer.add_argument("--strengths", default="0,0.5,1,2", help="comma-separated, each in [-50, 50]")
    steer.add_argument("--mask", help="steer only inside this mask image (the images' size)")
    steer.set_defaults(func=cmd_steer)

    compose = commands.add_parser("compose", help="interpolate or mix two images' feature maps; reconstruct")
    _add_analysis_args(compose)
    compose.add_argument("--mode", choices=["lerp", "slerp", "mask", "channels"], default="lerp")
    compose.add_argument("--ts", help="interpolation weights, e.g. 0,0.25,0.5,0.75,1")
    compose.add_argument("--mask", help="mode mask: b inside the mask, a outside (the images' size)")
    compose.add_argument("--channels", help="mode channels: channel groups, e.g. 0-63,100")
    compose.set_defaults(func=cmd_compose)

    robust = commands.add_parser("robustness", help="reconstruct from adversarial, corrupted and OOD inputs")
    _add_analysis_args(robust)
    robust.add_argument("--eps", type=arg("epsilon"), default=4 / 255, help="PGD L-inf radius (default 4/255)")
    robust.add_argument("--corruptions", help="comma-separated, default gaussian_noise,gaussian_blur,jpeg,contrast")
    robust.add_argument("--severity", type=arg("severity"), default=3, help="corruption severity 1-5")
    robust.set_defaults(func=cmd_robustness)

    evaluate = commands.add_parser(
        "evaluate", help="FeatInv spatial vs pooled vs the optimisation baseline vs guided vs hybrid sampling"
    )
    _add_analysis_args(evaluate, model_required=False, images=False)
    evaluate.add_argument("--pooled-model", help="a FeatInv model trained on pooled maps of the same classifier")
    evaluate.add_argument("--data", default="shapes", help="shapes (held-out), or an ImageNet-layout folder")
    evaluate.add_argument(
        "--n", "--num-images", dest="n", type=arg("images"), default=64, help="images to evaluate (default 64)"
    )
    evaluate.add_argument(
        "--fid-weights",
        help="pytorch-fid's FID Inception weights file (pt_inception-2015-12-05-6726825d.pth) for FID proper "
        "(default: the classifier's space)",
    )
    evaluate.add_argument(
        "--no-guided", action="store_true", help="leave out training-free guided sampling (the slowest column)"
    )
    evaluate.add_argument("--guided-steps", type=arg("steps"), help="guided sampling's sampler steps (default 20)")
    evaluate.add_argument(
        "--guided-strength", type=arg("strength"), help="guided sampling's forward strength (default 0.3)"
    )
    evaluate.add_argument(
        "--no-hybrid", action="store_true", help="leave out hybrid sampling (FeatInv's sampling refined by guidance)"
    )
    evaluate.add_argument(
        "--hybrid-strength",
        type=arg("strength"),
        help="hybrid sampling's forward strength (default 0.05; 0.001 for a distilled model)",
    )
    add_guidance_on_arg(evaluate, both=True)
    evaluate.set_defaults(func=cmd_evaluate)
    with_guided = ("guided sampling (not with --no-guided)", lambda args: not args.no_guided)
    only_with(
        evaluate,
        {
            "--guided-steps": with_guided,
            "--guided-strength": with_guided,
            "--hybrid-strength": ("hybrid sampling (not with --no-hybrid)", lambda args: not args.no_hybrid),
        },
    )
