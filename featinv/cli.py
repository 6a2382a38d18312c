"""``featinv <command>``: a thin face over the Python API.

Every command is a function taking parsed arguments. Input a user can fix is reported as one line
``featinv: error: ...`` with exit code 2, and a failed command leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the commands that run, not by --help
    import torch

from featinv.choices import GUIDANCE_MODES
from featinv.errors import FeatInvError
from featinv.files import publish
from featinv.limits import arg

DTYPES = ("fp32", "fp16", "bf16")  # --dtype choices; torch loads only when a command runs


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` choice."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        self.exit(2, f"featinv: error: {message} (see '{self.prog} --help')\n")


def check_output_location(out: str | Path, *, folder: bool = True) -> None:
    """Fail before any work when ``--out`` cannot be written: a folder output must not be an
    existing file (nor a file output an existing folder or special file), its parent folders are
    created and a probe folder is made and removed beside it (where the outputs are staged)."""
    from featinv.files import what_is_there

    out = Path(out)
    found = what_is_there(out)
    if folder and found not in ("not found", "a folder"):
        raise FeatInvError(f"--out {out} exists and is {found or 'a file'}, not a folder: give a folder path")
    if not folder and found not in ("not found", None):
        raise FeatInvError(f"--out {out} is {found}: give a file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent)).rmdir()
    except OSError as error:
        raise FeatInvError(f"--out {out} cannot be written ({out.parent}: {error.strerror or error})") from error


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
        publish(staging)  # mkdtemp made it 0700: outputs get the usual modes
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.replace(out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


UNGIVEN = object()  # the default of every option while given_options re-parses


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(sub)


def given_options(argv: Sequence[str] | None) -> set[str]:
    """The option dests the command line sets itself, not by default: ``argv`` parsed again with
    every default a sentinel (so a default value typed out, ``--pool 50000``, counts as given)."""
    parser = build_parser()
    for each in walk_parsers(parser):
        for action in each._actions:
            if action.default is not argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction):
                action.default = UNGIVEN
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not UNGIVEN}


def only_with(parser: argparse.ArgumentParser, rules: dict[str, tuple[str, Callable[[argparse.Namespace], bool]]]):
    """Declare options that mean something only with another: ``{"--teacher-steps": ("--distill",
    lambda args: args.distill)}``; given without it, the command is refused before any work
    (:func:`main` checks)."""
    dests = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    unknown = [flag for flag in rules if flag not in dests]
    if unknown:
        raise ValueError(f"only_with: {parser.prog} has no option {', '.join(unknown)}")
    table = dict(parser.get_default("only_with") or {})
    table.update({flag: (dests[flag], needs, holds) for flag, (needs, holds) in rules.items()})
    parser.set_defaults(only_with=table)


def refuse_unmet(args: argparse.Namespace, given: set[str]) -> None:
    """A FeatInvError for the first option given without the option it needs (:func:`only_with`)."""
    for flag, (dest, needs, holds) in (getattr(args, "only_with", None) or {}).items():
        if dest in given and not holds(args):
            raise FeatInvError(f"{flag} applies only with {needs}")


def load_model(args: argparse.Namespace):
    from featinv.models import FeatInvModel

    return FeatInvModel.from_pretrained(args.model)


def extractor_for(model, args: argparse.Namespace):
    from featinv.features import FeatureExtractor

    weights = getattr(args, "classifier_weights", None)
    if weights is None:
        return model.classifier
    extractor = FeatureExtractor.from_spec(model.feature_spec)
    extractor.load_classifier_weights(weights)
    return extractor


def required_extractor(model, args: argparse.Namespace):
    """:func:`extractor_for`, for commands that cannot work without the classifier."""
    extractor = extractor_for(model, args)
    if extractor is None:
        raise FeatInvError(f"{args.model} stores no classifier: pass --classifier-weights FILE")
    return extractor


def add_twin_encoder_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--twin-encoder",
        action="store_true",
        help="with --backend fast: run the ControlNet and the UNet's encoder as one network of two weight sets",
    )


def add_guidance_on_arg(parser: argparse.ArgumentParser, *, both: bool = False) -> None:
    parser.add_argument(
        "--guidance-on",
        choices=[*GUIDANCE_MODES, "both"] if both else GUIDANCE_MODES,
        help="what classifier-free guidance guides on: features (the unconditional branch is the zero feature "
        "map + the empty prompt) or prompt (the same feature map + the empty prompt, as the published FeatInv "
        "sampler); default: the model's own (info shows it)"
        + ("; both: FeatInv spatial in each mode, with their paired differences" if both else ""),
    )


def fast_options_from_args(args: argparse.Namespace) -> dict[str, bool] | None:
    """The fast backend's options the command line sets (``--twin-encoder``)."""
    if not args.twin_encoder:
        return None
    if args.backend != "fast":
        raise FeatInvError(f"--twin-encoder needs --backend fast, got --backend {args.backend}")
    return {"twin_encoder": True}


def _reconstructor(args: argparse.Namespace):
    from featinv.pipeline import Reconstructor, resolve_device

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32"))
    model = load_model(args)
    return Reconstructor(
        model,
        extractor=extractor_for(model, args),
        device=device,
        dtype=dtype,
        backend=args.backend,
        engine_dir=args.engine_dir,
        fast_options=fast_options_from_args(args),
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
    from featinv.models.featinv_model import FEW_STEP_SAMPLERS, read_model_config

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
    print(f"classifier in: {spec.input_size}, mean {spec.mean}, std {spec.std}")
    if spec.model_kwargs:
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


def _read_features(path: str) -> torch.Tensor:
    from featinv.weights import load_state_dict

    tensors = load_state_dict(path, what="features")
    if "features" not in tensors:
        raise FeatInvError(f"features file {path} has no tensor named 'features' (has: {', '.join(tensors)})")
    features = tensors["features"]
    if features.ndim == 0 or len(features) == 0:
        raise FeatInvError(
            f"features file {path} holds no feature maps: its 'features' tensor has shape {tuple(features.shape)}, "
            "expected (B, C, h, w) with B >= 1"
        )
    return features.float()


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct images from the feature maps of image files (or a features file), one or
    several samples each (with the samples' per-pixel spread)."""
    import torch

    from featinv.analysis.metrics import SPREAD_MAX, sample_spread
    from featinv.images import heatmap, load_images, make_grid, save_image

    if args.images is None and args.features is None:
        raise FeatInvError("give --images FILES... or --features FILE")
    if args.guidance_on is not None and args.method != "featinv":
        raise FeatInvError(f"--guidance-on applies to --method featinv, not --method {args.method}")
    if args.method == "guided":
        from featinv.cli_guided import cmd_guided

        return cmd_guided(args)
    if args.model is None:
        if args.method != "optimize" or args.classifier is None:
            raise FeatInvError("give --model DIR, or --method optimize --classifier NAME (no FeatInv model needed)")
        from featinv.cli_optimize import cmd_optimize

        return cmd_optimize(args)
    if args.classifier is not None:
        raise FeatInvError("--classifier goes without --model (the model names its classifier)")
    from featinv.training.distributed import barrier, shard

    reconstructor = _reconstructor(args)
    reconstructor.sampling_defaults(args.steps, args.guidance, args.sampler)  # refuse a mismatch before any work
    size = reconstructor.spec.input_size[1:]
    # Under accelerate launch / torchrun each process takes a contiguous share, seeded by global index.
    if args.images:
        first, paths = shard(args.images)
        every_stem = _unique_stems(args.images)
        crop = reconstructor.spec.crop_pct  # the classifier's eval transform: shorter side, centre crop
        originals, features = (load_images(paths, size, crop) if paths else None), None
    else:
        every = _read_features(args.features)
        first, paths = shard(range(len(every)))
        every_stem = [f"features_{i:03d}" for i in range(len(every))]
        originals, features = None, every[first : first + len(paths)]
    stems = every_stem[first : first + len(paths)]
    samples = args.samples
    names = _sample_names(every_stem, samples)
    runs = []  # per sample: (images, 3, H, W); sample k of image i is seeded seed + k * N + i
    if stems:
        maps = reconstructor.features(originals, pooled=args.pooled) if originals is not None else features
        if args.method == "optimize" and reconstructor.extractor is None:
            raise FeatInvError(f"{args.model} stores no classifier: --method optimize needs --classifier-weights")
    for k in range(samples if stems else 0):
        seed = args.seed + k * len(every_stem)
        if args.method == "optimize":  # at the classifier's own input size, not the model's image size
            from featinv.cli_optimize import optimize_images

            runs.append(optimize_images(reconstructor.extractor, maps, args, seed))
        else:
            result = reconstructor.reconstruct(
                features=maps,
                steps=args.steps,
                guidance_scale=args.guidance,
                guidance=args.guidance_on,
                sampler=args.sampler,
                eta=args.eta,
                seed=seed,
                first_index=first,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
            runs.append(result.images)
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
        image_size = reconstructor.model.image_size
        columns = [load_images([Path(args.out) / names[stem][k] for stem in shown], image_size) for k in range(samples)]
        if samples > 1:
            columns.append(load_images([Path(args.out) / names[stem][-1] for stem in shown], image_size))
        if args.images:
            columns.insert(0, load_images(args.images[: len(shown)], size, reconstructor.spec.crop_pct))
        with staged_output(args.out) as staging:
            save_image(make_grid(columns, scale=max(1, 128 // columns[0].shape[-1])), staging / "grid.png")
        what = f"{len(every_stem)} reconstruction{'s' * (len(every_stem) != 1)}"
        if samples > 1:
            what += f", {samples} samples each, their spread maps (per-pixel std over the samples, 0 to 0.5)"
        print(f"wrote {what} and grid.png to {args.out}")
    return 0


def _sample_names(stems: Sequence[str], samples: int) -> dict[str, list[str]]:
    """Each input's output files: ``stem.png`` (sample 0, as with one sample), ``stem_sample{k}.png``,
    and with several samples ``stem_spread.png`` last; an input whose name another's outputs take
    (``a_sample1.png`` beside ``a.png``) is refused."""
    names = {stem: [f"{stem}.png"] + [f"{stem}_sample{k}.png" for k in range(1, samples)] for stem in stems}
    if samples > 1:
        for stem in stems:
            names[stem].append(f"{stem}_spread.png")
    taken = [name for files in names.values() for name in files]
    if len(set(taken)) != len(taken):
        clash = next(name for name in taken if taken.count(name) > 1)
        raise FeatInvError(f"with --samples {samples} two outputs would be named {clash}: rename an input")
    return names


def cmd_extract(args: argparse.Namespace) -> int:
    """Write the feature maps of image files to a safetensors file (key ``features``)."""
    import torch

    from featinv.images import load_images
    from featinv.weights import save_state_dict_atomic

    model = load_model(args)
    extractor = required_extractor(model, args)
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
    model = load_model(args)
    manifest = export_onnx(model, args.out, dtype=torch_dtype(args.dtype), opset=args.opset, exporter=args.exporter)
    files = ", ".join(sorted(manifest["sha256"]))
    print(f"wrote {files} (ONNX opset {manifest['opset']}, {args.exporter} exporter, checked) to {args.out}")
    if args.format == "tensorrt":
        from featinv.engine import make_denoiser

        make_denoiser(model.to("cuda"), "tensorrt", engine_dir=args.out)
        print(f"built the TensorRT engine into {Path(args.out) / 'tensorrt'}")
    return 0


def _parse_layer(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def cmd_create(args: argparse.Namespace) -> int:
    """Create a new (untrained) FeatInv model from a preset or a diffusers base and a classifier."""
    from featinv.features import FeatureExtractor
    from featinv.models import FeatInvModel

    if (args.preset is None) == (args.base is None):
        raise FeatInvError("give exactly one of --preset NAME or --base DIR_OR_HUB_ID")
    if args.base is not None:
        from featinv.models.base import base_kind

        base_kind(args.base)  # a folder or a hub id, before the classifier is built
    elif args.prompt is not None or args.bundle:
        raise FeatInvError("--prompt and --bundle apply to --base (a preset has no text encoder and no base folder)")
    model_kwargs = json_object_arg("--classifier-kwargs", args.classifier_kwargs)
    input_size = (3, args.input_size, args.input_size) if args.input_size else None
    extractor = FeatureExtractor(
        args.classifier,
        _parse_layer(args.layer),
        mode="pooled" if args.pooled else "spatial",
        weights=args.classifier_weights,
        model_kwargs=model_kwargs,
        input_size=input_size,
    )
    sizes = {k: getattr(args, k) for k in ("image_size", "hint_channels") if getattr(args, k) is not None}
    if args.preset is not None:
        model = FeatInvModel.from_preset(args.preset, extractor, seed=args.seed, **sizes)
    else:
        prompt = {"prompt": args.prompt} if args.prompt is not None else {}
        model = FeatInvModel.from_base(args.base, extractor, seed=args.seed, **prompt, **sizes)
    model.save_pretrained(args.out, bundle=args.bundle)
    height, width = model.image_size
    where = f"refers to its base {model.base}" if model.base is not None and not args.bundle else "self-contained"
    print(
        f"created {args.out}: {extractor.spec.describe()}; images {height}x{width}, latents "
        f"{'x'.join(map(str, model.latent_shape))}; {where}"
    )
    return 0


def json_object_arg(flag: str, text: str | None) -> dict:
    """The JSON object a flag was given ({} when not given); anything else is a one-line error."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise FeatInvError(f"{flag} must be a JSON object, got {text!r}") from error
    if not isinstance(value, dict):
        raise FeatInvError(f"{flag} must be a JSON object, got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="FeatInv model folder")
    parser.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")


def build_parser() -> argparse.ArgumentParser:
    import featinv

    parser = Parser(prog="featinv", description="See what an image classifier sees: invert its feature maps.")
    parser.add_argument("--version", action="version", version=f"featinv {featinv.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    info = commands.add_parser("info", help="print a model's feature spec")
    info.add_argument("--model", required=True, help="FeatInv model folder")
    info.add_argument("--json", action="store_true", help="print the raw configuration as JSON")
    info.set_defaults(func=cmd_info)

    rec = commands.add_parser("reconstruct", help="reconstruct images from feature maps")
    rec.add_argument("--model", help="FeatInv model folder (not needed with --method optimize --classifier NAME)")
    rec.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    rec.add_argument("--classifier", help="a timm model name: with --method optimize (no --model) or --method guided")
    rec.add_argument("--layer", help="with --classifier: forward_features (default), a feature_info index or a module")
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
        choices=["ddim", "dpmpp", "lcm"],
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
    rec.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument(
        "--method",
        choices=["featinv", "optimize", "guided"],
        default="featinv",
        help="featinv (diffusion), optimize (the Mahendran-Vedaldi baseline) or guided (the model's base alone, "
        "steered by the classifier's gradients); the last two need no training",
    )
    rec.add_argument(
        "--opt-steps", type=arg("opt_steps"), help="with --method optimize: Adam steps (default 300, 1000 above 160 px)"
    )
    rec.add_argument(
        "--backend",
        choices=["eager", "compiled", "fast", "onnx", "tensorrt"],
        default="eager",
        help="denoiser backend (fast: CUDA only)",
    )
    rec.add_argument("--engine-dir", help="ONNX export / TensorRT engine cache (default: under ~/.cache/featinv)")
    add_twin_encoder_arg(rec)
    add_guidance_on_arg(rec)
    from featinv.cli_guided import add_guided_args

    add_guided_args(rec)
    rec.set_defaults(func=cmd_reconstruct)
    with_classifier = ("--classifier NAME", lambda args: args.classifier is not None)
    guided = ("--method guided", lambda args: args.method == "guided")
    only_with(
        rec,
        {
            "--layer": with_classifier,
            "--input-size": with_classifier,
            "--opt-steps": ("--method optimize", lambda args: args.method == "optimize"),
            "--strength": guided,
            "--inner-steps": guided,
            "--inner-step-size": guided,
            "--distance": guided,
            "--eta": ("--sampler ddim", lambda args: args.sampler in (None, "ddim")),
        },
    )

    create = commands.add_parser("create", help="create an untrained FeatInv model for a classifier and layer")
    create.add_argument("--preset", help="micro, tiny, minisd or sd15 (random base weights)")
    create.add_argument("--base", help="a diffusers base: local folder, or a hub id (downloads)")
    create.add_argument("--classifier", required=True, help="timm model name, e.g. resnet50")
    create.add_argument("--layer", help="forward_features (default), a feature_info index, or a module path")
    create.add_argument("--classifier-weights", help="local classifier weights (safetensors or .pth)")
    create.add_argument("--classifier-kwargs", help="JSON of extra timm.create_model arguments")
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

    from featinv.cli_convert import add_convert_command

    add_convert_command(commands)

    from featinv.cli_demo import add_demo_command

    add_demo_command(commands)

    from featinv.cli_training import add_training_commands

    add_training_commands(commands)

    export = commands.add_parser("export", help="export the denoiser to ONNX (or a TensorRT engine)")
    export.add_argument("--model", required=True, help="FeatInv model folder")
    export.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    export.add_argument("--out", required=True, help="output folder (denoiser.onnx, hint_encoder.onnx, manifest)")
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--opset", type=arg("opset"), help="ONNX opset (default: 17 with torchscript, 18 with dynamo)")
    export.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx's TorchScript exporter (fast; deprecated by torch) or its dynamo successor (needs onnxscript)",
    )
    export.set_defaults(func=cmd_export)

    from featinv.cli_analysis import add_analysis_commands

    add_analysis_commands(commands)

    from featinv.cli_serve import add_serve_command

    add_serve_command(commands)

    ext = commands.add_parser("extract", help="write the feature maps of images to a safetensors file")
    add_model_args(ext)
    ext.add_argument("--images", nargs="+", required=True)
    ext.add_argument("--out", required=True, help="output .safetensors file")
    ext.add_argument("--pooled", action="store_true")
    ext.set_defaults(func=cmd_extract, writes_file=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # a usage error (argparse's, one line) or --help: its exit code, returned like any other
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    try:
        refuse_unmet(args, given_options(argv))
        if getattr(args, "out", None) is not None:
            check_output_location(args.out, folder=not getattr(args, "writes_file", False))
        return args.func(args)
    except FeatInvError as error:
        print(f"featinv: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written, a full disk: the system's words
        where = f": {error.filename}" if error.filename else ""
        print(f"featinv: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("featinv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
