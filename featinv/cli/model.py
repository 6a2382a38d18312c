"""``featinv info | create | export | extract``: a model folder's commands (see
:mod:`featinv.cli.options` for what they share)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featinv.cli.options import (
    add_dtype_arg,
    add_model_args,
    add_source_args,
    load_model,
    new_extractor,
    required_extractor,
    torch_dtype,
)
from featinv.errors import FeatInvError
from featinv.limits import arg


def cmd_info(args: argparse.Namespace) -> int:
    """Print a model's feature spec and configuration."""
    from featinv.models.model_config import FEW_STEP_SAMPLERS, read_model_config

    if not Path(args.model).is_dir():
        raise FeatInvError(f"model folder not found: {args.model}")
    config = read_model_config(args.model)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    from featinv.features import FeatureSpec
    from featinv.sampling.schedule import NoiseSchedule

    where = f"{Path(args.model) / 'featinv.json'}"
    spec = FeatureSpec.from_dict(config["feature_spec"], f"{where}: feature_spec")
    NoiseSchedule.from_dict(config["noise_schedule"], f"{where}: noise_schedule")
    print(f"model folder:  {args.model}")
    print(f"features:      {spec.describe()}")
    print(f"source:        {spec.source}{' (imported only with --trust-code)' if spec.source == 'module' else ''}")
    print(f"classifier in: {spec.input_size}, mean {spec.mean}, std {spec.std}")
    if spec.model_kwargs and spec.source != "transformers":  # transformers: its whole config (see --json)
        print(f"classifier kw: {spec.model_kwargs}")
    print(f"latent model:  {'yes (VAE)' if config.get('has_vae') else 'no (pixel space)'}")
    image_size, latent_shape = _model_shapes(args.model, config)
    print(f"image size:    {image_size}")
    print(f"latent shape:  {latent_shape}")
    base = config.get("base")
    print(f"base:          {base['source'] + ' (referred to)' if isinstance(base, dict) else 'bundled in the folder'}")
    print(f"classifier:    {'stored' if config.get('has_classifier') else 'not stored (pass --classifier-weights)'}")
    print(f"prompt:        {config.get('prompt')!r}")
    guidance = config.get("guidance", "features")
    unconditional = "the same feature map" if guidance == "prompt" else "the zero feature map"
    print(f"guidance on:   {guidance} (unconditional branch: {unconditional} + the null context)")
    distilled = config.get("distillation")
    if distilled:
        sampler = FEW_STEP_SAMPLERS[distilled["method"]]
        print(
            f"distilled:     {distilled['method']}, guidance {distilled['guidance_scale']:g} folded in: "
            f"sample with 1-4 {sampler} steps"
        )
    print(f"schedule:      {config['noise_schedule']}")
    return 0


def _model_shapes(folder: str, config: dict) -> tuple[str, str]:
    """The output image size and the latent shape of a model folder, as text ("?" when unknown):
    from featinv.json, or for folders written before it recorded them, from unet/ and vae/."""
    if "image_size" in config and "latent_shape" in config:
        return "x".join(map(str, config["image_size"])), "x".join(map(str, config["latent_shape"]))
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text(encoding="utf-8"))
        size = unet["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        factor = 1
        if config.get("has_vae"):
            vae = json.loads((Path(folder) / "vae" / "config.json").read_text(encoding="utf-8"))
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return f"{height * factor}x{width * factor}", f"{unet['in_channels']}x{height}x{width}"
    except (OSError, ValueError, KeyError, TypeError):
        return "?", "?"


def cmd_create(args: argparse.Namespace) -> int:
    """Create a new (untrained) FeatInv model from a preset or a diffusers base and a classifier."""
    from featinv.models import FeatInvModel

    if (args.preset is None) == (args.base is None):
        raise FeatInvError("give exactly one of --preset NAME or --base DIR_OR_HUB_ID")
    if args.base is not None:
        from featinv.models.base import base_kind

        base_kind(args.base)  # a folder or a hub id, before the classifier is built
    elif args.prompt is not None or args.bundle:
        raise FeatInvError("--prompt and --bundle apply to --base (a preset has no text encoder and no base folder)")
    extractor = new_extractor(
        args.source,
        args.classifier,
        args.classifier_module,
        layer=args.layer,
        mode="pooled" if args.pooled else "spatial",
        weights=args.classifier_weights,
        kwargs_text=args.classifier_kwargs,
        input_side=args.input_size,
        normalization_text=args.classifier_normalization,
    )
    sizes = {k: getattr(args, k) for k in ("image_size", "hint_channels") if getattr(args, k) is not None}
    if args.preset is not None:
        model = FeatInvModel.from_preset(args.preset, extractor, seed=args.seed, **sizes)
    else:
        prompt = {"prompt": args.prompt} if args.prompt is not None else {}
        model = FeatInvModel.from_base(args.base, extractor, seed=args.seed, **prompt, **sizes)
    if args.classifier_weights is not None:  # what 'featinv train-classifier' recorded beside its weights
        from featinv.models.class_names import read_class_names

        model.class_names = read_class_names(Path(args.classifier_weights).parent)
    model.save_pretrained(args.out, bundle=args.bundle)
    height, width = model.image_size
    where = f"refers to its base {model.base}" if model.base is not None and not args.bundle else "self-contained"
    print(
        f"created {args.out}: {extractor.spec.describe()}; images {height}x{width}, latents "
        f"{'x'.join(map(str, model.latent_shape))}; {where}"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Write the feature maps of image files to a safetensors file (key ``features``)."""
    import torch

    from featinv.images import load_images
    from featinv.weights import save_state_dict_atomic

    model = load_model(args.model, args.trust_code)
    extractor = required_extractor(model, args.classifier_weights, args.model, args.trust_code)
    from featinv.features import pool_and_tile

    images = load_images(args.images, model.feature_spec.input_size[1:], model.feature_spec.crop_pct)
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
    model = load_model(args.model, args.trust_code)
    manifest = export_onnx(model, args.out, dtype=torch_dtype(args.dtype), opset=args.opset, exporter=args.exporter)
    files = ", ".join(sorted(manifest["sha256"]))
    print(f"wrote {files} (ONNX opset {manifest['opset']}, {args.exporter} exporter, checked) to {args.out}")
    if args.format == "tensorrt":
        from featinv.engine import make_denoiser

        make_denoiser(model.to("cuda"), "tensorrt", engine_dir=args.out)
        print(f"built the TensorRT engine into {Path(args.out) / 'tensorrt'}")
    return 0


def add_info_command(commands) -> None:
    """Register ``info``."""
    info = commands.add_parser("info", help="print a model's feature spec")
    info.add_argument("--model", required=True, help="FeatInv model folder")
    info.add_argument("--json", action="store_true", help="print the raw configuration as JSON")
    info.set_defaults(func=cmd_info)


def add_create_command(commands) -> None:
    """Register ``create``."""
    create = commands.add_parser("create", help="create an untrained FeatInv model for a classifier and layer")
    create.add_argument("--preset", help="micro, tiny, minisd or sd15 (random base weights)")
    create.add_argument("--base", help="a diffusers base: local folder, or a hub id (downloads)")
    create.add_argument(
        "--classifier",
        help="the classifier: a timm or torchvision model name (resnet50), or a transformers folder or hub id",
    )
    add_source_args(create)
    create.add_argument(
        "--layer",
        help="timm: forward_features (default), a feature_info index, or a module path; torchvision and "
        "--classifier-module: a module path (layer3, features.6; default: the last spatial one); transformers: "
        "a hidden-state index (0: the embeddings) or last (default)",
    )
    create.add_argument("--classifier-weights", help="local classifier weights (safetensors or .pth)")
    create.add_argument(
        "--classifier-kwargs",
        help="JSON of extra constructor arguments (timm.create_model, torchvision's get_model, your factory) or, "
        "for transformers, config fields",
    )
    create.add_argument(
        "--input-size", type=arg("input_size"), help="classifier input side in pixels (default: the model's)"
    )
    create.add_argument("--pooled", action="store_true", help="a model of pooled maps (the paper's baseline)")
    create.add_argument("--prompt", help="with --base: the fixed prompt its text encoder encodes once")
    create.add_argument(
        "--image-size",
        type=arg("image_size"),
        help="training and output resolution in pixels (default: the base's; SD1.5: try 256)",
    )
    create.add_argument(
        "--hint-channels",
        type=arg("hint_channels"),
        help="hidden width of the hint encoder (default: 512, presets own)",
    )
    create.add_argument(
        "--bundle", action="store_true", help="with --base: copy the base's UNet and VAE into the folder (offline use)"
    )
    create.add_argument("--seed", type=arg("seed"), default=0)
    create.add_argument("--out", required=True, help="output model folder")
    create.set_defaults(func=cmd_create)


def add_export_command(commands) -> None:
    """Register ``export``."""
    export = commands.add_parser("export", help="export the denoiser to ONNX (or a TensorRT engine)")
    export.add_argument("--model", required=True, help="FeatInv model folder")
    export.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    export.add_argument("--out", required=True, help="output folder (denoiser.onnx, hint_encoder.onnx, manifest)")
    add_dtype_arg(export, ["fp32", "fp16"], "fp32", "the exported denoiser's dtype")
    export.add_argument("--opset", type=arg("opset"), help="ONNX opset (default: 17 with torchscript, 18 with dynamo)")
    export.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx's TorchScript exporter (fast; deprecated by torch) or its dynamo successor (needs onnxscript)",
    )
    export.set_defaults(func=cmd_export)


def add_extract_command(commands) -> None:
    """Register ``extract``."""
    ext = commands.add_parser("extract", help="write the feature maps of images to a safetensors file")
    add_model_args(ext)
    ext.add_argument("--images", nargs="+", required=True)
    ext.add_argument("--out", required=True, help="output .safetensors file")
    ext.add_argument("--pooled", action="store_true")
    ext.set_defaults(func=cmd_extract, writes_file=True)
