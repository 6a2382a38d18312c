"""``featinv reconstruct --method guided``: training-free inversion (:mod:`featinv.analysis.guided`)
from the command line. The FeatInv model given supplies the base (UNet, VAE, prompt contexts, noise
schedule) and its ControlNet is not used, so an untrained model from ``featinv create`` serves; the
classifier is the model's or, with ``--classifier NAME``, any timm classifier and layer (see
:mod:`featinv.cli` for the conventions every command follows)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from featinv.errors import FeatInvError
from featinv.limits import arg


def add_guided_args(parser: argparse.ArgumentParser) -> None:
    """The guidance options of ``reconstruct --method guided`` (their defaults are
    :class:`featinv.analysis.guided.GuidanceConfig`'s; not imported here, to keep start-up light)."""
    group = parser.add_argument_group("with --method guided (training-free, on the model's base)")
    group.add_argument(
        "--strength", type=arg("strength"), help="forward guidance strength, 0 = the base's own samples (0.3)"
    )
    group.add_argument(
        "--inner-steps",
        type=arg("inner_steps"),
        help="backward-guidance gradient steps on the clean estimate per step (2)",
    )
    group.add_argument(
        "--inner-step-size", type=arg("step_size"), help="RMS change of the clean estimate per inner step (0.01)"
    )
    group.add_argument("--distance", choices=["cosine", "l2"], help="the feature distance to lower (cosine)")


def guidance_from_args(args: argparse.Namespace):
    """The :class:`GuidanceConfig` the command line asks for, its defaults where an option is not
    given (``--steps`` 20, ``--guidance`` 1: off)."""
    from featinv.analysis.guided import GuidanceConfig

    options = {"strength", "inner_steps", "inner_step_size", "distance", "steps", "guidance", "sampler"}
    given = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    if "guidance" in given:
        given["guidance_scale"] = given.pop("guidance")
    return GuidanceConfig(**given, pooled=args.pooled)


def cmd_guided(args: argparse.Namespace) -> int:
    """Invert the feature maps of ``--images`` (or ``--features``) by guided sampling; write one PNG
    per input (and sample) and grid.png."""
    from featinv.analysis.guided import GuidedReconstructor
    from featinv.cli import load_model, required_extractor
    from featinv.cli_optimize import classifier_from_args, classifier_inputs, write_inversions
    from featinv.features import pool_and_tile
    from featinv.pipeline import resolve_device

    if args.model is None:
        raise FeatInvError(
            "--method guided needs --model DIR: a FeatInv model on the base to sample from (an untrained one "
            "from 'featinv create --base ... --classifier ...' serves; its ControlNet is not used)"
        )
    config = guidance_from_args(args)
    samples, batch_size = args.samples, args.batch_size
    model = load_model(args)
    extractor = classifier_from_args(args, mode="spatial") if args.classifier else required_extractor(model, args)
    if extractor.spec.mode == "pooled":  # a pooled model's maps: match their means
        config = replace(config, pooled=True)
    device = resolve_device(args.device)
    guided = GuidedReconstructor(model, extractor=extractor, device=device, config=config)
    stems, originals, maps = classifier_inputs(guided.extractor, args)
    if args.pooled and args.images:
        maps = pool_and_tile(maps)
    runs = []
    for k in range(samples):
        result = guided.reconstruct(
            features=maps, seed=args.seed + k * len(stems), batch_size=batch_size, progress=not args.quiet
        )
        runs.append(result.images)
    write_inversions(args, stems, originals, runs)
    print(
        f"wrote {len(stems)} guided inversion(s) of {guided.spec.describe()} ({config.steps} {config.sampler} steps, "
        f"strength {config.strength:g}, {config.inner_steps} inner steps; no ControlNet) and grid.png to {args.out}"
    )
    return 0
