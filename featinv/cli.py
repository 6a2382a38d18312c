"""``featinv <command>``: a thin face over the Python API.

Every command is a function taking parsed arguments. Input a user can fix is reported as one line
``featinv: error: ...`` with exit code 2, and a failed command leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from featinv.errors import FeatInvError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        self.exit(2, f"featinv: error: {message} (see '{self.prog} --help')\n")


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; its files move into ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatInvError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.replace(out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_model(args: argparse.Namespace):
    from featinv.models import FeatInvModel

    return FeatInvModel.from_pretrained(args.model)


def _extractor(model, args: argparse.Namespace):
    from featinv.features import FeatureExtractor

    weights = getattr(args, "classifier_weights", None)
    if weights is None:
        return model.classifier
    extractor = FeatureExtractor.from_spec(model.feature_spec)
    extractor.load_classifier_weights(weights)
    return extractor


def _reconstructor(args: argparse.Namespace):
    from featinv.pipeline import Reconstructor, resolve_device

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    model = _load_model(args)
    return Reconstructor(
        model,
        extractor=_extractor(model, args),
        device=device,
        dtype=dtype,
        backend=args.backend,
        engine_dir=args.engine_dir,
    )


def _unique_stems(paths: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's feature spec and configuration."""
    from featinv.models.featinv_model import read_model_config

    if not Path(args.model).is_dir():
        raise FeatInvError(f"model folder not found: {args.model}")
    config = read_model_config(args.model)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    from featinv.features import FeatureSpec

    spec = FeatureSpec.from_dict(config["feature_spec"])
    print(f"model folder:  {args.model}")
    print(f"features:      {spec.describe()}")
    print(f"classifier in: {spec.input_size}, mean {spec.mean}, std {spec.std}")
    if spec.model_kwargs:
        print(f"classifier kw: {spec.model_kwargs}")
    print(f"latent model:  {'yes (VAE)' if config.get('has_vae') else 'no (pixel space)'}")
    print(f"classifier:    {'stored' if config.get('has_classifier') else 'not stored (pass --classifier-weights)'}")
    print(f"prompt:        {config.get('prompt')!r}")
    print(f"schedule:      {config['noise_schedule']}")
    return 0


def _read_features(path: str) -> torch.Tensor:
    from featinv.weights import load_state_dict

    tensors = load_state_dict(path, what="features")
    if "features" not in tensors:
        raise FeatInvError(f"features file {path} has no tensor named 'features' (has: {', '.join(tensors)})")
    return tensors["features"].float()


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct images from the feature maps of image files (or a features file)."""
    from featinv.images import load_images, make_grid, save_image

    if args.images is None and args.features is None:
        raise FeatInvError("give --images FILES... or --features FILE")
    from featinv.training.distributed import barrier, shard

    reconstructor = _reconstructor(args)
    size = reconstructor.spec.input_size[1:]
    # Under accelerate launch / torchrun each process takes a contiguous share, seeded by global index.
    if args.images:
        first, paths = shard(args.images)
        every_stem = _unique_stems(args.images)
        originals, features = (load_images(paths, size) if paths else None), None
    else:
        every = _read_features(args.features)
        first, paths = shard(range(len(every)))
        every_stem = [f"features_{i:03d}" for i in range(len(every))]
        originals, features = None, every[first : first + len(paths)]
    stems = every_stem[first : first + len(paths)]
    if stems and args.method == "optimize":
        from featinv.analysis.studies import make_inverter

        if reconstructor.extractor is None:
            raise FeatInvError(f"{args.model} stores no classifier: --method optimize needs --classifier-weights")
        maps = reconstructor.features(originals, pooled=args.pooled) if originals is not None else features
        from featinv.analysis.optimize import OptimizeConfig

        invert = make_inverter(reconstructor, "optimize", seed=args.seed, optimize=OptimizeConfig(steps=args.opt_steps))
        result = SimpleNamespace(images=invert(maps))
    elif stems:
        result = reconstructor.reconstruct(
            originals,
            features=features,
            steps=args.steps,
            guidance_scale=args.guidance,
            sampler=args.sampler,
            eta=args.eta,
            seed=args.seed,
            first_index=first,
            batch_size=args.batch_size,
            pooled=args.pooled,
            progress=not args.quiet,
        )
    if stems:
        with staged_output(args.out) as staging:
            for stem, image in zip(stems, result.images, strict=True):
                save_image(image, staging / f"{stem}.png")
    barrier()
    if first == 0:  # the process with the first share merges: the grid of the first 16 of all
        shown = every_stem[:16]
        columns = [load_images([Path(args.out) / f"{stem}.png" for stem in shown], reconstructor.model.image_size)]
        if args.images:
            columns.insert(0, load_images(args.images[: len(shown)], size))
        with staged_output(args.out) as staging:
            save_image(make_grid(columns, scale=max(1, 128 // columns[0].shape[-1])), staging / "grid.png")
        print(f"wrote {len(every_stem)} reconstructions and grid.png to {args.out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Write the feature maps of image files to a safetensors file (key ``features``)."""
    from featinv.images import load_images
    from featinv.weights import save_state_dict_atomic

    model = _load_model(args)
    extractor = _extractor(model, args)
    if extractor is None:
        raise FeatInvError(f"{args.model} stores no classifier: pass --classifier-weights FILE")
    from featinv.features import pool_and_tile

    images = load_images(args.images, model.feature_spec.input_size[1:])
    with torch.no_grad():
        features = extractor(images)
    if args.pooled:
        features = pool_and_tile(features)
    save_state_dict_atomic({"features": features}, args.out)
    print(f"wrote features {tuple(features.shape)} of {model.feature_spec.describe()} to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the denoiser (and hint encoder) to ONNX, or build a TensorRT engine from that export."""
    from featinv.engine.export import export_onnx

    if args.format == "tensorrt":
        from featinv.engine.tensorrt import require_tensorrt

        require_tensorrt()  # one clear line, before anything is written
    model = _load_model(args)
    manifest = export_onnx(model, args.out, dtype=DTYPES[args.dtype], opset=args.opset)
    print(f"wrote {', '.join(sorted(manifest['sha256']))} (ONNX opset {args.opset}, checked) to {args.out}")
    if args.format == "tensorrt":
        from featinv.engine import make_denoiser

        make_denoiser(model.to("cuda"), "tensorrt", engine_dir=args.out)
        print(f"built the TensorRT engine into {Path(args.out) / 'tensorrt'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The interactive web app (FastAPI + one HTML page) on the demo model or --model DIR."""
    try:
        from featinv.web.app import serve
    except ImportError as error:
        raise FeatInvError(f"featinv serve needs the web extra: pip install 'featinv[web]' ({error})") from error
    if args.model is not None and not Path(args.model).is_dir():
        raise FeatInvError(f"model folder not found: {args.model}")
    print(f"serving on http://{args.host}:{args.port}")
    serve(args.model, host=args.host, port=args.port, device=args.device)
    return 0


def _parse_layer(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def cmd_create(args: argparse.Namespace) -> int:
    """Create a new (untrained) FeatInv model from a preset or a diffusers base and a classifier."""
    from featinv.features import FeatureExtractor
    from featinv.models import FeatInvModel

    if (args.preset is None) == (args.base is None):
        raise FeatInvError("give exactly one of --preset NAME or --base DIR_OR_HUB_ID")
    if args.base is not None and not Path(args.base).is_dir() and args.base.startswith((".", "/", "~")):
        raise FeatInvError(f"--base folder not found: {args.base}")
    try:
        model_kwargs = json.loads(args.classifier_kwargs) if args.classifier_kwargs else {}
    except json.JSONDecodeError as error:
        raise FeatInvError(f"--classifier-kwargs must be a JSON object, got {args.classifier_kwargs!r}") from error
    if not isinstance(model_kwargs, dict):
        raise FeatInvError(f"--classifier-kwargs must be a JSON object, got {args.classifier_kwargs!r}")
    input_size = (3, args.input_size, args.input_size) if args.input_size else None
    extractor = FeatureExtractor(
        args.classifier,
        _parse_layer(args.layer),
        weights=args.classifier_weights,
        model_kwargs=model_kwargs,
        input_size=input_size,
    )
    if args.preset is not None:
        model = FeatInvModel.from_preset(args.preset, extractor, seed=args.seed)
    else:
        model = FeatInvModel.from_base(args.base, extractor, seed=args.seed)
    model.save_pretrained(args.out)
    print(f"created {args.out}: {extractor.spec.describe()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The built-in default: reconstruct held-out shapes images from spatial and pooled features."""
    from featinv.demo import run_demo

    metrics = run_demo(args.out, device=args.device, n=args.n, steps=args.steps)
    if "seconds" not in metrics:  # another process of a multi-process run: the main one reports
        return 0
    for mode in ("spatial", "pooled"):
        m = metrics[mode]
        print(
            f"{mode:>8}: top-1 agreement {m['top1_agreement']:.3f}  feature cosine {m['feature_cosine']:.3f}  "
            f"mask IoU {m['mask_iou']:.3f}  centroid distance {m['centroid_distance_px']:.2f} px"
        )
    print(f"wrote grid.png, metrics.json and report.html to {args.out} ({metrics['seconds']} s)")
    return 0


def _stream(data: str, size: int, *, pool: int, seed: int, augment: bool):
    """The training stream for ``--data``: ``shapes`` (a seeded pool) or an ImageNet-layout folder."""
    if data == "shapes":
        from featinv.training.train import ShapesStream

        if pool < 1:
            raise FeatInvError(f"--pool must be >= 1, got {pool}")
        return ShapesStream(pool_size=pool, seed=seed, device=torch.device("cpu"), size=size)
    from featinv.training.image_folder import ImageFolderStream

    return ImageFolderStream(data, size, seed=seed, augment=augment)


def _model_and_extractor(args: argparse.Namespace, device: torch.device):
    model = _load_model(args).to(device)
    extractor = _extractor(model, args)
    if extractor is None:
        raise FeatInvError(f"{args.model} stores no classifier: pass --classifier-weights FILE")
    return model, extractor.to(device)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the shapes-demo preset, or the ControlNet of a model folder on shapes or an image folder."""
    from featinv.training.loop import TrainConfig

    if (args.preset is None) == (args.model is None):
        raise FeatInvError("give exactly one of --preset shapes-demo or --model DIR")
    common = {"checkpoint_every": args.checkpoint_every, "grad_accum": args.grad_accum, "ema_decay": args.ema}
    if args.preset is not None:
        from featinv.training.demo_preset import train_shapes_demo

        if args.preset != "shapes-demo":
            raise FeatInvError(f"--preset must be shapes-demo, got {args.preset!r}")
        train_shapes_demo(
            args.out,
            device=args.device,
            scale=args.scale,
            time_budget_s=args.time_budget,
            resume=args.resume,
            features_cache=args.features_cache,
            **common,
        )
        return 0
    from featinv.training.distributed import get_accelerator
    from featinv.training.feature_cache import load_cache
    from featinv.training.train import OnlineFeatures, loss_curve_png, train_controlnet

    accelerator = get_accelerator(args.device)
    model, extractor = _model_and_extractor(args, accelerator.device)
    config = TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, time_budget_s=args.time_budget, **common
    )
    stream = _stream(
        args.data, model.image_size[0], pool=args.pool, seed=args.seed, augment=args.features_cache is None
    )
    features = (
        OnlineFeatures(extractor) if args.features_cache is None else load_cache(args.features_cache, extractor, stream)
    )
    out = Path(args.out)
    result = train_controlnet(
        model,
        features,
        stream,
        config,
        seed=args.seed,
        checkpoint_dir=out / "checkpoints",
        log_path=out / "train_log.jsonl",
        resume=args.resume,
    )
    if accelerator.is_main_process:
        model.to("cpu").save_pretrained(out / "model")
        loss_curve_png(out / "train_log.jsonl", out / "loss_curve.png")
        state = "finished" if result.finished else f"stopped at step {result.steps_done} (--resume continues)"
        print(f"{state}; wrote {out / 'model'}, train_log.jsonl and loss_curve.png")
    return 0


def cmd_features_cache(args: argparse.Namespace) -> int:
    """Compute a training pool's feature maps once (unflipped and flipped) into a safetensors file."""
    from featinv.pipeline import resolve_device
    from featinv.training.feature_cache import build_cache

    model, extractor = _model_and_extractor(args, resolve_device(args.device))
    stream = _stream(args.data, model.image_size[0], pool=args.pool, seed=args.seed, augment=False)
    path = build_cache(extractor, stream, args.out, batch_size=args.batch_size, dtype=args.dtype)
    print(f"wrote the features of {len(stream)} images ({extractor.spec.describe()}, x2 flips) to {path}")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    """Write a shapes dataset in ImageNet layout: images/<class>/NNNNN.png and masks/<class>/NNNNN.png."""
    from featinv.training.shapes import write_shapes

    write_shapes(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} shapes images and masks ({args.size} px, seed {args.seed}) to {args.out}")
    return 0


def _analysis_reconstructor(args: argparse.Namespace, model_path: str | None = None):
    from featinv.pipeline import Reconstructor, resolve_device

    args.model = model_path or args.model
    model = _load_model(args)
    extractor = _extractor(model, args)
    if extractor is None:
        raise FeatInvError(f"{args.model} stores no classifier: pass --classifier-weights FILE")
    return Reconstructor(model, extractor=extractor, device=resolve_device(args.device))


def _inverter(args: argparse.Namespace, reconstructor):
    from featinv.analysis.optimize import OptimizeConfig
    from featinv.analysis.studies import make_inverter

    optimize = OptimizeConfig(steps=args.opt_steps)
    return make_inverter(
        reconstructor, args.method, steps=args.steps, sampler=args.sampler, seed=args.seed, optimize=optimize
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
        return load_images(args.images, size)
    from featinv.demo import DEMO_SEED
    from featinv.training.shapes import generate_shapes

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
            files = (
                sorted(p for p in Path(folder or "").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder else []
            )
            if not files:
                raise FeatInvError(f"{flag} {folder} holds no images (.png, .jpg, ...)")
            examples[flag] = reconstructor.features(load_images(files, reconstructor.spec.input_size[1:]))
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
    """FeatInv spatial, FeatInv pooled and the optimisation baseline side by side."""
    from featinv.analysis.optimize import OptimizeConfig
    from featinv.analysis.studies import evaluate_study
    from featinv.training.demo_preset import POOLED_DIR, PRETRAINED, SPATIAL_DIR

    if args.n < 2:
        raise FeatInvError(f"--n must be >= 2 (FID needs two images), got {args.n}")
    model_path = args.model or str(PRETRAINED / SPATIAL_DIR)
    pooled_path = args.pooled_model or (str(PRETRAINED / POOLED_DIR) if args.model is None else None)
    spatial = _analysis_reconstructor(args, model_path)
    pooled = _analysis_reconstructor(args, pooled_path) if pooled_path else None
    size = spatial.model.image_size
    masks = None
    if args.data == "shapes":
        from featinv.demo import DEMO_SEED
        from featinv.training.shapes import generate_shapes

        held_out = generate_shapes(args.n, DEMO_SEED, size=size[0])
        images, masks = held_out.images, held_out.masks
        real = generate_shapes(args.n, DEMO_SEED + 1, size=size[0]).images
    else:
        from featinv.training.image_folder import ImageFolderStream

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
        optimize=OptimizeConfig(steps=args.opt_steps),
        seed=args.seed,
        fid_features=fid_features,
    )
    for name, row in data["methods"].items():
        print(f"{name:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    for line in data["verdicts"]:
        print(line)
    print(f"wrote grid.png, metrics.png, metrics.json and report.html to {args.out}")
    return 0


def _add_analysis_args(parser: argparse.ArgumentParser, *, model_required: bool = True, images: bool = True) -> None:
    from featinv.training.demo_preset import PRETRAINED, SPATIAL_DIR

    default = None if not model_required else str(PRETRAINED / SPATIAL_DIR)
    parser.add_argument("--model", default=default, help="FeatInv model folder (default: the shipped demo model)")
    parser.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    if images:
        parser.add_argument("--images", nargs="+", help="image files (default: --shapes held-out shapes images)")
        parser.add_argument("--shapes", type=int, default=4, help="without --images: this many held-out shapes images")
    parser.add_argument("--method", choices=["featinv", "optimize"], default="featinv")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    parser.add_argument("--sampler", choices=["ddim", "dpmpp"], default="dpmpp")
    parser.add_argument("--opt-steps", type=int, default=300, help="steps of the optimisation baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="FeatInv model folder")
    parser.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featinv", description="See what an image classifier sees: invert its feature maps.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("info", help="print a model's feature spec")
    info.add_argument("--model", required=True, help="FeatInv model folder")
    info.add_argument("--json", action="store_true", help="print the raw configuration as JSON")
    info.set_defaults(func=cmd_info)

    rec = commands.add_parser("reconstruct", help="reconstruct images from feature maps")
    _add_model_args(rec)
    rec.add_argument("--images", nargs="+", help="image files whose feature maps to invert")
    rec.add_argument("--features", help="a safetensors file with a 'features' tensor (B, C, h, w)")
    rec.add_argument("--out", required=True, help="output folder (one PNG per input and grid.png)")
    rec.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    rec.add_argument("--guidance", type=float, default=1.75, help="classifier-free guidance scale (default 1.75)")
    rec.add_argument("--sampler", choices=["ddim", "dpmpp"], default="ddim")
    rec.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--batch-size", type=int, default=8)
    rec.add_argument("--pooled", action="store_true", help="condition on pooled features (the paper's baseline)")
    rec.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    rec.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument(
        "--method",
        choices=["featinv", "optimize"],
        default="featinv",
        help="featinv (diffusion) or optimize (the Mahendran-Vedaldi baseline, no training needed)",
    )
    rec.add_argument("--opt-steps", type=int, default=300, help="with --method optimize: gradient steps")
    rec.add_argument(
        "--backend", choices=["eager", "compiled", "onnx", "tensorrt"], default="eager", help="denoiser backend"
    )
    rec.add_argument("--engine-dir", help="ONNX export / TensorRT engine cache (default: under ~/.cache/featinv)")
    rec.set_defaults(func=cmd_reconstruct)

    create = commands.add_parser("create", help="create an untrained FeatInv model for a classifier and layer")
    create.add_argument("--preset", help="tiny, minisd or sd15 (random base weights)")
    create.add_argument("--base", help="a diffusers base: local folder, or a hub id (downloads)")
    create.add_argument("--classifier", required=True, help="timm model name, e.g. resnet50")
    create.add_argument("--layer", help="forward_features (default), a feature_info index, or a module path")
    create.add_argument("--classifier-weights", help="local classifier weights (safetensors or .pth)")
    create.add_argument("--classifier-kwargs", help="JSON of extra timm.create_model arguments")
    create.add_argument("--input-size", type=int, help="classifier input side in pixels (default: the model's)")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--out", required=True, help="output model folder")
    create.set_defaults(func=cmd_create)

    demo = commands.add_parser("demo", help="the built-in default on the shipped tiny models")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--n", "--num-images", dest="n", type=int, default=200, help="held-out images (default 200)")
    demo.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps (default 10)")
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train the shapes-demo preset, or a model's ControlNet on data")
    train.add_argument("--preset", help="shapes-demo: the built-in default's classifier, base and ControlNets")
    train.add_argument("--model", help="a model folder (from 'featinv create'): train its ControlNet, base frozen")
    train.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    train.add_argument("--data", default="shapes", help="with --model: shapes, or an ImageNet-layout folder")
    train.add_argument("--out", required=True, help="output folder (models, checkpoints/, train_log.jsonl)")
    train.add_argument("--device", default="cpu", help="cpu or cuda (accelerate picks the rank's GPU)")
    train.add_argument("--scale", type=float, default=1.0, help="with --preset: multiply the step counts")
    train.add_argument("--steps", type=int, default=5000, help="with --model: optimizer steps")
    train.add_argument("--batch-size", type=int, default=64, help="with --model: global batch per micro-step")
    train.add_argument("--lr", type=float, default=5e-4, help="with --model: peak learning rate")
    train.add_argument("--pool", type=int, default=50_000, help="with --data shapes: images in the training pool")
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--ema", type=float, help="EMA decay of the trained weights, e.g. 0.999 (default: off)")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: at stops)")
    train.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    train.add_argument("--features-cache", help="a cache from 'featinv features cache' instead of online features")
    train.add_argument("--time-budget", type=float, help="seconds; stops early past it (checkpointed)")
    train.set_defaults(func=cmd_train)

    features = commands.add_parser("features", help="feature-map utilities")
    features_commands = features.add_subparsers(dest="features_command", required=True, parser_class=_Parser)
    cache = features_commands.add_parser("cache", help="compute a training pool's feature maps once")
    _add_model_args(cache)
    cache.add_argument("--data", default="shapes", help="shapes, or an ImageNet-layout folder")
    cache.add_argument("--pool", type=int, default=50_000, help="with --data shapes: images in the pool")
    cache.add_argument("--seed", type=int, default=1, help="the pool's seed (as given to 'featinv train')")
    cache.add_argument("--out", required=True, help="output .safetensors file")
    cache.add_argument("--batch-size", type=int, default=256)
    cache.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    cache.add_argument("--device", default="auto")
    cache.set_defaults(func=cmd_features_cache)

    data = commands.add_parser("data", help="write datasets to disk")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    shapes = data_commands.add_parser("shapes", help="the procedural shapes dataset, ImageNet layout, with masks")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--n", type=int, default=1000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=32)
    shapes.set_defaults(func=cmd_data_shapes)

    export = commands.add_parser("export", help="export the denoiser to ONNX (or a TensorRT engine)")
    export.add_argument("--model", required=True, help="FeatInv model folder")
    export.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    export.add_argument("--out", required=True, help="output folder (denoiser.onnx, hint_encoder.onnx, manifest)")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--opset", type=int, default=17)
    export.set_defaults(func=cmd_export)

    steer = commands.add_parser("steer", help="steer feature maps toward a class or concept; reconstruct a strip")
    _add_analysis_args(steer)
    steer.add_argument("--class", dest="class_index", type=int, help="a class index of the classifier's head")
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
    robust.add_argument("--eps", type=float, default=4 / 255, help="PGD L-inf radius (default 4/255)")
    robust.add_argument("--corruptions", help="comma-separated, default gaussian_noise,gaussian_blur,jpeg,contrast")
    robust.add_argument("--severity", type=int, default=3, help="corruption severity 1-5")
    robust.set_defaults(func=cmd_robustness)

    evaluate = commands.add_parser("evaluate", help="FeatInv spatial vs pooled vs the optimisation baseline")
    _add_analysis_args(evaluate, model_required=False, images=False)
    evaluate.add_argument("--pooled-model", help="a FeatInv model trained on pooled maps of the same classifier")
    evaluate.add_argument("--data", default="shapes", help="shapes (held-out), or an ImageNet-layout folder")
    evaluate.add_argument("--n", "--num-images", dest="n", type=int, default=64, help="images to evaluate (default 64)")
    evaluate.add_argument("--fid-weights", help="timm inception_v3 weights for FID proper (default: the classifier)")
    evaluate.set_defaults(func=cmd_evaluate)

    serve = commands.add_parser("serve", help="the interactive web app")
    serve.add_argument("--model", help="FeatInv model folder (default: the shipped demo model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto")
    serve.set_defaults(func=cmd_serve)

    ext = commands.add_parser("extract", help="write the feature maps of images to a safetensors file")
    _add_model_args(ext)
    ext.add_argument("--images", nargs="+", required=True)
    ext.add_argument("--out", required=True, help="output .safetensors file")
    ext.add_argument("--pooled", action="store_true")
    ext.set_defaults(func=cmd_extract)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FeatInvError as error:
        print(f"featinv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featinv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
